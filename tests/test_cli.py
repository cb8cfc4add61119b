import argparse
from dataclasses import dataclass

import pytest

from tendiff import cli
from tendiff.evaluate import EvalConfig, parse_args as evaluate_args
from tendiff.protocol import T_STAR
from tendiff.train import parse_args as train_args


@dataclass
class Demo:
    name: str = cli.field(help="positional")
    dataset: str = cli.field(help="required option", choices=("a", "b"), flag="--dataset")
    steps: int = cli.field(5, "an int")
    scale: float | None = cli.field(None, "a float or nothing", type=float)
    tags: tuple = cli.field(("x", "y"), "several")
    fast: bool = cli.field(False, "a switch")
    timing: bool = cli.field(True, "turn it off", flag="--no-timing")
    hidden: int = 3  # no help: not an option


def parse(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p, Demo)
    return cli.from_args(Demo, p.parse_args(argv))


def test_each_field_becomes_one_option():
    d = parse(["n", "--dataset", "b", "--steps", "7", "--scale", "0.5", "--tags", "p", "q", "r", "--fast", "--no-timing"])
    assert d == Demo("n", "b", 7, 0.5, ("p", "q", "r"), True, False, 3)
    assert parse(["n", "--dataset", "a"]) == Demo("n", "a")
    with pytest.raises(SystemExit):
        parse(["n"])  # --dataset is required
    with pytest.raises(SystemExit):
        parse(["n", "--dataset", "c"])  # not a choice
    with pytest.raises(SystemExit):
        parse(["n", "--dataset", "a", "--hidden", "4"])


def test_train_and_evaluate_options_come_from_their_configs():
    cfg = train_args(["purifier", "--dataset", "mnist", "--conv", "ttm", "--rank", "3", "--no-manifest"])
    assert (cfg.label, cfg.manifest, cfg.steps, cfg.lr) == ("ttm-r3", False, 5000, None)
    args = evaluate_args(["--dataset", "cifar10", "--seeds", "10", "--no-timing", "--corruptions", "none", "exact"])
    ev = cli.from_args(EvalConfig, args)
    assert (ev.seeds, ev.timing, ev.corruptions, ev.t_star) == (10, False, ("none", "exact"), T_STAR["cifar10"])
