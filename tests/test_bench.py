"""The benchmark command runs and prints every table it promises (timings are not asserted:
machines are noisy)."""
from tendiff import bench


def test_bench_prints_forward_layer_and_purification_tables(capsys):
    bench.main(["--batch-sizes", "1", "2", "--ranks", "2", "--layouts", "tt", "--repeats", "1", "--steps", "2",
                "--skip", "long", "throughput", "app"])
    out = capsys.readouterr().out
    assert "allocator" in out
    for heading in ("## U-Net forward", "## Single 3x3 conv layers", "## Whole purification"):
        assert heading in out
    purify = out.split("## Whole purification")[1]
    for row in ("| dense | nchw |", "| dense | channels-last |", "| tt-r2 | auto |"):
        assert row in purify
    assert "b2_x" in purify and "peak resident memory" in out


def test_whole_purification_times_every_requested_layout(capsys):
    bench.main(["--batch-sizes", "1", "--ranks", "1", "--layouts", "tt", "ttm", "--repeats", "1", "--steps", "1",
                "--skip", "forward", "layers", "long", "throughput", "app"])
    purify = capsys.readouterr().out.split("## Whole purification")[1]
    assert "| tt-r1 | auto |" in purify and "| ttm-r1 | auto |" in purify


def test_allocator_tuning_applies_on_glibc_linux():
    import platform

    import pytest

    from tendiff.runtime import tune_allocator
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_allocator() is True and tune_allocator() is True  # applied, and idempotent
