"""brain-gen's models (seed 004) over MEG/EEG tokens and signals: token-grid sequence models (STGPT2MEG,
TASA3D, Wavenet3D, WavenetFullChannel, FlatGPT, BrainOmniCausalForecast), continuous-signal models (BENDRForecast,
NTD, the factorized autoencoder) and the classifiers."""
