"""docs/benchmarks.md keeps one section per kind of machine (and one for start-up)."""

from pathlib import Path

from benchmark_scripts import load_benchmark_script


def load_bench():
    return load_benchmark_script("page")


def test_a_run_replaces_its_own_section_and_keeps_the_other(tmp_path: Path) -> None:
    bench = load_bench()
    page = tmp_path / "benchmarks.md"
    bench.write_section(page, "cpu", "## CPU only\n\nfirst cpu run\n")
    bench.write_section(page, "gpu", "## GPU: NVIDIA H200\n\ngpu run\n")
    bench.write_section(page, "cpu", "## CPU only\n\nsecond cpu run\n")
    text = page.read_text()
    assert text.startswith("# Benchmarks")
    assert "second cpu run" in text and "first cpu run" not in text
    assert "gpu run" in text
    # CPU first, then GPU, each once.
    assert text.index("<!-- bench:cpu -->") < text.index("<!-- bench:gpu -->")
    assert text.count("## CPU only") == 1 and text.count("## GPU: NVIDIA H200") == 1
    bench.write_section(page, "startup", "## Start-up\n\nfirst\n")
    text = page.read_text()
    assert text.index("<!-- bench:gpu -->") < text.index("<!-- bench:startup -->")
    assert "second cpu run" in text and "gpu run" in text


def test_every_benchmark_script_imports(monkeypatch) -> None:
    """A rename in src must not leave `make bench` or `make bench-scale` broken until someone
    runs them (bench.py once imported a Dataset that had been renamed)."""

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    for name in ("bench", "startup", "scale", "image_cache"):
        module = load_benchmark_script(name)
        assert callable(module.main), name
