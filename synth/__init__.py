"""Synthetic music with labels: the demo corpus (demo.py) and the probe corpus (probe.py), both played by
music.py's synthesiser. For the demo, the tests and the benchmarks; the pipeline itself never imports it."""
