"""Every model tokfleet trains, grouped by family; the trainer reaches them only through `registry`.

    registry.py   model_name -> (config dataclass, builder, flavors, task); reports.py: what models log
    layers/       shared building blocks: RMSNorm + rotary (transformer.py), causal convs, SEANet, MoE, HF backbones
    text/         GPT (nanochat-style), TokCom VAE + diffusion
    tokenizers/   signal and video tokenizers (TOTEM, BrainOmni, Vidtok), their quantisers and losses, flat tokenizers
    brain/        brain-gen's sequence models over MEG/EEG (and video) tokens and signals
"""
