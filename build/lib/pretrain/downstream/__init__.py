"""Using a trained encoder: embeddings (extract.py), MARBLE-style probes (probe.py, probe_data.py,
probe_metrics.py) and the Hugging Face export (export_hf.py). Nothing here is needed to train."""
