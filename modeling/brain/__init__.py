"""brain-gen's continuous-signal models: BENDRForecast, NTD and the factorized autoencoder."""
