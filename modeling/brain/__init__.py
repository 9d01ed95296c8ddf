"""brain-gen's token-grid sequence models (seed 004): STGPT2MEG, TASA3D, Wavenet3D, WavenetFullChannel."""
