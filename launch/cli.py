"""The `tokfleet` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import logging
import re
import sys
from pathlib import Path

from core.errors import UserError, exit_on_missing_package, exit_on_user_error, stop_at_once
from core.arguments import CommandLineParser, non_negative_float, non_negative_int, positive_int

DESCRIPTION = """tokfleet: train token-based generative models (text, MEG/EEG, video) from one
config per stage, on one device or a cluster. Stages: prepare (corpus -> shards) -> train ->
generate. Every command takes --help; bad input exits with code 2 and one line saying why."""


# ------------------------------------------------------------------ arguments


# ------------------------------------------------------------------ prepare


@contextlib.contextmanager
def stop_on_interrupt(output: str, debug: bool):
    """Ctrl-C in prepare / pretokenize: one line and the process ends at once (exit 130). Its Ray work ends
    with it: a local instance dies with its driver, a cluster cancels a dead driver's tasks. Every complete
    shard stays (each was written whole, then renamed into place); the next run removes temporary files
    and builds the rest. (With --debug: a KeyboardInterrupt and its traceback.)"""
    import signal

    line = f"tokfleet: interrupted: the complete shards in {output} are kept; the same command builds the rest"
    previous = None if debug else signal.signal(signal.SIGINT, lambda signum, frame: stop_at_once(line))
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def cmd_prepare(args: argparse.Namespace) -> None:
    from core.config import PrepareConfig, dump_config, load_config

    with exit_on_user_error(args.debug):
        cfg = load_config(args.config, PrepareConfig, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return
        from core.netns import ensure_confined

        if not cfg.ray.address:  # a local Ray stays on loopback on shared machines; a cluster is joined where it is
            ensure_confined()
        options = dict(progress=not args.quiet, strict=args.strict, overwrite=args.overwrite)  # Ray starts only if a shard is missing
        with stop_on_interrupt(cfg.shards.output, args.debug):
            if cfg.source.kind == "tokens":
                from sharding.token_ids import prepare_token_ids

                print(prepare_token_ids(cfg, **options).summary())
                return
            if cfg.source.kind == "timeseries":
                from sharding.timeseries import prepare_timeseries

                print(prepare_timeseries(cfg, **options).summary())
                return
            if cfg.source.kind != "text":
                from sharding.prepare_signals import prepare_signals

                print(prepare_signals(cfg, **options).summary())
                return
            from sharding.pretokenize_text import prepare_text

            manifest = prepare_text(cfg, **options)
    num_train = sum(s.num_samples for s in manifest.shards if s.split == "train")
    num_val = sum(s.num_samples for s in manifest.shards if s.split == "val")
    print(f"dataset {cfg.shards.output}: {len(manifest.shards)} shards, {num_train} train + {num_val} val "
          f"sequences of {manifest.seq_len + 1} tokens, vocab {manifest.vocab_size}, {len(manifest.skipped)} inputs skipped")


# ------------------------------------------------------------------ pretokenize / eval


def cmd_pretokenize(args: argparse.Namespace) -> None:
    from core.config import PretokenizeConfig, dump_config, load_config

    with exit_on_user_error(args.debug):
        cfg = load_config(args.config, PretokenizeConfig, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return
        from core.netns import ensure_confined

        if not cfg.ray.address:  # a local Ray stays on loopback on shared machines; a cluster is joined where it is
            ensure_confined()
        from sharding.pretokenize_signals import pretokenize_signals
        from trainer.tokenizer_runner import describe_checkpoint

        with stop_on_interrupt(cfg.shards.output, args.debug):  # Ray starts only if a shard is missing
            report = pretokenize_signals(cfg, describe_checkpoint, progress=not args.quiet, strict=args.strict,
                                         overwrite=args.overwrite)
    print(report.summary())


def cmd_analyze(args: argparse.Namespace) -> None:
    from sharding import storage
    from sharding.analysis import AnalyzeOptions, analyze
    from sharding.analysis_report import format_report

    with exit_on_user_error(args.debug):
        out = args.out
        if out is None:
            if not storage.is_local(args.dataset):
                raise UserError(f"{args.dataset} is not a local folder: name where the report goes with --out")
            out = str(Path(storage.local_path(args.dataset)) / "analysis")
        if args.ray:
            from core.netns import ensure_confined

            if not args.ray_address:
                ensure_confined()
        options = AnalyzeOptions(split=args.split, max_patterns=args.max_patterns, num_outliers=args.outliers,
                                 use_ray=args.ray or bool(args.ray_address), ray_address=args.ray_address, plots=not args.no_plots)
        report = analyze(args.dataset, out, options)
    print(format_report(report, out))


def cmd_eval(args: argparse.Namespace) -> None:
    from trainer.causal_eval import checkpoint_task, evaluate_causal, format_causal_report
    from trainer.classification import evaluate_classifier, format_classification_report
    from trainer.engines.single import pick_device
    from trainer.signal_eval import evaluate_signal, format_signal_report, is_signal_model
    from trainer.tokenizer_runner import evaluate, format_report

    with exit_on_user_error(args.debug):
        name, task = checkpoint_task(args.checkpoint)
        common = dict(split=args.split, num_batches=args.num_batches, batch_size=args.batch_size, device=pick_device(args.device))
        if task == "classification":  # the confusion matrix PNG beside the JSON report, else in the run's plots/
            report = evaluate_classifier(args.checkpoint, args.data, **common, plot=Path(args.out).with_suffix(".png") if args.out else None)
            formatter = format_classification_report
        else:
            # a sequence model, a continuous-signal model (forecast / reconstruction), else a tokenizer
            run, formatter = ((evaluate_causal, format_causal_report) if task == "causal_lm" else
                              (evaluate_signal, format_signal_report) if is_signal_model(name) else (evaluate, format_report))
            report = run(args.checkpoint, args.data, **common)
    print(formatter(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def cmd_forecast(args: argparse.Namespace) -> None:
    from trainer.engines.single import pick_device
    from trainer.forecast import BASELINES, ForecastRequest, forecast

    with exit_on_user_error(args.debug):
        request = ForecastRequest(
            forecaster=args.forecaster, tokenizer=args.tokenizer, data=args.data, recording=args.recording, split=args.split,
            num_windows=args.num_windows, context=args.context, horizon=args.horizon, num_samples=args.num_samples,
            temperature=args.temperature, top_k=args.top_k, seed=args.seed, out=args.out, device=str(pick_device(args.device)),
        )
        report = forecast(request)
    if report["kind"] == "timeseries_windows":
        print(f"forecast {report['model']}, {report['num_windows']} windows of {report['data']}: "
              f"context {report['context']['steps']} steps, horizon {report['horizon']['steps']} steps")
    else:
        unit = "samples" if report["kind"] == "meg_windows" else "frames"
        print(f"forecast {report['model']} on {report['tokenizer_model']} codes, {report['num_windows']} windows of {report['data']}: "
              f"context {report['context'][unit]} {unit}, horizon {report['horizon'][unit]} {unit}, {report['num_samples']} sample(s)")
    print(f"  {'method':16s} {'MSE':>10s} {'MAE':>10s} {'corr':>7s} {'scale err':>9s}   (normalised units)")
    for name in ("model", "mean_of_samples", *BASELINES):
        if name in report["metrics"]:
            m = report["metrics"][name]["normalized"]
            corr = "-" if m["correlation"] is None else f"{m['correlation']:.3f}"
            print(f"  {name:16s} {m['mse']:10.4g} {m['mae']:10.4g} {corr:>7s} {m['scale_error']:9.3f}")
    print(f"  wrote {args.out}/forecast.json and {', '.join(report['outputs'])}")


# ------------------------------------------------------------------ train / demo


def cmd_train(args: argparse.Namespace) -> None:
    from trainer.entry import run

    run(args)


def cmd_demo(args: argparse.Namespace) -> None:
    if args.which == "meg":
        from launch.demo_meg import run
    else:
        from launch.demo import run

    run(args)


# ------------------------------------------------------------------ generate


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from modeling.registry import get_model_spec
    from sharding.text_tokenizer import load_tokenizer
    from trainer.engines.single import pick_device
    from trainer.inference import load_model

    is_ids = args.prompt_tokens is not None  # ids in, ids out: no text tokenizer
    with exit_on_user_error(args.debug):
        if is_ids and args.prompt:
            raise UserError("--prompt (text) and --prompt-tokens (ids) exclude each other: give one")
        device = pick_device(args.device)
        model, state, tokenizer_dir = load_model(args.checkpoint, device)
        name = state["model"]["name"]
        if is_ids and get_model_spec(name).task != "causal_lm":
            raise UserError(f"--prompt-tokens continues a causal token model (gpt); {name} is a {get_model_spec(name).task} model")
        if get_model_spec(name).task == "causal_lm" and not hasattr(model, "generate"):
            raise UserError(f"{name} continues grids of codes (channels x time), not one sequence: use `tokfleet forecast "
                            f"{args.checkpoint} --data RAW_DATASET`")
        if not is_ids:
            if tokenizer_dir is None or not tokenizer_dir.is_dir():
                raise UserError(f"{args.checkpoint}: no tokenizer folder next to the checkpoint's run dir "
                                "(a model trained on token ids continues --prompt-tokens)")
            tokenizer, eos_id = load_tokenizer(str(tokenizer_dir))
        if getattr(model, "inference_modes", None):  # latent chunk models (TokCom): --mode generate/reconstruct/encode
            from trainer.latent_inference import LatentRequest, run_latent_mode, seed_config

            request = LatentRequest(args.mode or model.inference_modes[0], args.input_text, args.num_chunks,
                                    args.num_steps, args.batch_size, args.output_file, args.seed)
            lines = run_latent_mode(model, tokenizer, eos_id, request, device)
            config = seed_config(model, state, tokenizer_dir)
            print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in config.items()), file=sys.stderr)
            print("\n".join(lines))
            return
        if args.mode is not None:
            raise UserError(f"--mode is for latent models (TokCom); {name} continues --prompt")
        limit = state["model"]["args"]["sequence_len"]
        if is_ids:
            ids = _prompt_token_ids(args.prompt_tokens, state["model"]["args"]["vocab_size"])
        else:
            ids = tokenizer.encode(args.prompt, add_special_tokens=False) if args.prompt else []
            if not ids:
                ids = [eos_id]
        max_new = min(args.max_new_tokens, limit - len(ids))
        if max_new <= 0:
            raise UserError(f"--prompt{'-tokens' if is_ids else ''} is {len(ids)} tokens: no room left in the model's context of {limit}")
        generator = torch.Generator(device=device).manual_seed(args.seed)
        prompt = torch.tensor([ids] * args.num_samples, device=device)
        out = model.generate(prompt, max_new, temperature=args.temperature, top_k=args.top_k, generator=generator)
    for i, row in enumerate(out.tolist()):
        if is_ids:  # one line per sample, the prompt first
            print(" ".join(map(str, row)))
            continue
        text = tokenizer.decode(row[len(ids):], skip_special_tokens=False)
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(args.prompt + text)


def _prompt_token_ids(text: str, vocab_size: int) -> list[int]:
    """--prompt-tokens "80 81 83": whitespace-separated ids, each in [0, vocab_size)."""
    words = text.split()
    if not words:
        raise UserError("--prompt-tokens: no ids given (whitespace-separated integers, e.g. \"80 81 83\")")
    ids = []
    for index, word in enumerate(words):
        if not re.fullmatch(r"-?[0-9]+", word):
            raise UserError(f"--prompt-tokens: {word!r} (index {index}) is not an integer token id")
        if not 0 <= int(word) < vocab_size:
            raise UserError(f"--prompt-tokens: id {word} (index {index}) is outside the model's vocabulary [0, {vocab_size})")
        ids.append(int(word))
    return ids


# ------------------------------------------------------------------ inspect


def cmd_inspect(args: argparse.Namespace) -> None:
    with exit_on_user_error(args.debug):
        path = args.path
        if path.endswith("trainer_state.json"):  # a checkpoint's state file: that checkpoint
            path = str(Path(path).parent)
        is_pointer = Path(path).is_file() and Path(path).parent.name == "checkpoints"  # checkpoints/latest, best: what they name
        if Path(path).is_file() and not is_pointer:
            raise UserError(f"{path} is a file: inspect takes a dataset root (holding manifest.json), a checkpoint folder or a run dir")
        if is_pointer or (Path(path).is_dir() and not (Path(path) / "manifest.json").exists()):
            _inspect_checkpoint(path)
            return
        from sharding.manifest import Manifest
        from sharding.shard_build import verify_dataset

        manifest = Manifest.read(path, {})
        problems = verify_dataset(path)
    splits: dict[str, list[int]] = {}
    for shard in manifest.shards:
        splits.setdefault(shard.split, []).append(shard.num_samples)
    vocab = f"vocab {manifest.vocab_size}, " if manifest.vocab_size else ""
    num_bytes = sum(shard.num_bytes for shard in manifest.shards)
    print(f"dataset {path}: kind {manifest.kind}, {vocab}seq_len {manifest.seq_len}, {num_bytes / 1e6:.1f} MB")
    for split, counts in splits.items():
        print(f"  {split}: {len(counts)} shards, {sum(counts)} samples")
    for name, field in manifest.fields.items():
        if "dtype" in field:  # None: a size that varies between samples (e.g. MEG channels)
            print(f"  field {name}: {field['dtype']} ({', '.join('*' if n is None else str(n) for n in field['shape'])})")
    counts = manifest.stats.get("label_counts")
    if counts:  # a labelled dataset (sharding/labels.py): windows per class and split
        print("  classes: " + ", ".join(f"{name} ({' / '.join(f'{counts[s].get(name, 0)} {s}' for s in counts)})"
                                        for name in manifest.fields["label.npy"]["classes"]))
    print(f"  skipped inputs: {len(manifest.skipped)}")
    for entry in manifest.skipped[:10]:
        print(f"    {entry.path}: {entry.reason}")
    if problems:
        for problem in problems:
            print(f"  PROBLEM: {problem}")
        sys.exit(1)
    print("  all shards verified (size, sha256, sample count, fields, unique keys)")


def _inspect_checkpoint(path: str) -> None:
    from trainer.checkpoint import read_trainer_state, verify_checkpoint
    from trainer.inference import resolve_checkpoint
    from trainer.resume_state import parts_problems

    directory = resolve_checkpoint(path, verify=False)  # its problems are listed below
    state = read_trainer_state(directory)
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    model = state["model"]
    info = state.get("engine_info", {})
    print(f"checkpoint {directory}")
    print(f"  step {state['step']}, tokens {state['tokens']}, samples {state['samples']}")
    print(f"  engine {state['engine']} ({state.get('format', 'torch')} format), world size {state['world_size']}"
          + (f", ZeRO stage {info['zero_stage']}" if "zero_stage" in info else "")
          + "".join(f", {k} {v}" for k, v in info.items() if k != "zero_stage"))
    print(f"  model {model['name']} ({model['flavor']}): {json.dumps(model['args'])}")
    if "exported_from" in state:
        source = state["exported_from"]
        print(f"  exported from {source['checkpoint']} ({source['engine']}, {source['world_size']} rank(s))")
    if "data" in state:
        print(f"  data position: {_data_position(directory, state)}")
    print(f"  size {size / 1e6:.1f} MB in {sum(1 for p in directory.rglob('*') if p.is_file())} files")
    problems = verify_checkpoint(directory) + parts_problems(directory, state)
    try:
        best = _best_checkpoint(directory)
    except UserError as error:  # the run's best pointer names no complete checkpoint
        problems.append(str(error))
        best = None
    if best is not None:
        print(f"  best checkpoint: {best}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    if problems:
        sys.exit(1)
    print("  all files verified (sizes as written, trainer state, safetensors headers)")


def _best_checkpoint(directory: Path) -> str | None:
    """"step-00000020 (val_loss 2.31, min)" when the run `directory` belongs to keeps a `checkpoints/best`
    (checkpoint.keep_best); a UserError when that pointer names no complete checkpoint."""
    from trainer.checkpoint import BEST_FILE, read_pointer, read_trainer_state

    if directory.parent.name != "checkpoints" or not (directory.parent / BEST_FILE).is_file():
        return None
    best = read_pointer(directory.parent / BEST_FILE)
    record = read_trainer_state(best).get("best") or {}
    if record.get("step") != int(best.name.split("-")[1]) or record.get("value") is None:
        return best.name
    return f"{best.name} ({record['metric']} {record['value']:.6g}, {record['mode']})"


def _data_position(directory: Path, state: dict) -> str:
    """Epoch and samples read of it, from every rank's stream positions (needs the dataset)."""
    from core.config import DataConfig
    from core.schema import from_dict
    from sharding.loader import ShardLoader, merge_states
    from sharding.manifest import Manifest
    from trainer.resume_state import all_loader_states

    try:
        merged = merge_states(all_loader_states(directory, state))
    except UserError as error:  # a part is missing: verification below lists it
        return f"unknown ({error})"
    text = f"epoch {merged['epoch']}, {len(merged['positions'])} streams over {state['world_size']} rank(s)"
    try:
        data_cfg = from_dict(DataConfig, state["config"]["data"])
        manifest = Manifest.read(data_cfg.dataset, data_cfg.storage_options)
        loader = ShardLoader(manifest, data_cfg.dataset, data_cfg.train_split, num_streams=merged["num_streams"],
                             seed=merged["seed"], shuffle=data_cfg.shuffle)
        loader.load_state_dict(merged)
        read = len(loader) - loader.num_remaining()
        text += f", {read} of {len(loader)} samples of the epoch read"
    except Exception as error:  # the dataset may live elsewhere: the positions are still shown
        text += f" (dataset not readable here: {str(error).splitlines()[0][:80]})"
    return text


# ------------------------------------------------------------------ export


def cmd_export(args: argparse.Namespace) -> None:
    from safetensors import safe_open

    from trainer.export import export_checkpoint

    with exit_on_user_error(args.debug):
        out = export_checkpoint(args.checkpoint, args.out)
    with safe_open(out / "model.safetensors", "pt") as handle:
        count = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    print(f"exported {args.checkpoint} -> {out} ({count:,} parameters, fp32)")


# ------------------------------------------------------------------ models


def cmd_models(args: argparse.Namespace) -> None:
    from modeling.registry import build_model, get_model_spec, list_models

    names = list_models()
    width = max(map(len, names))
    for name in names:
        spec = get_model_spec(name)
        for flavor in spec.flavors:
            model = build_model(name, flavor, device="meta")
            print(f"{name:{width}s} {flavor:8s} {model.num_params() / 1e6:10.2f}M params  task={spec.task}")


def cmd_config_reference(args: argparse.Namespace) -> None:
    from core.config import PrepareConfig, PretokenizeConfig, TrainConfig
    from core.schema import describe

    for title, cls in (("train config", TrainConfig), ("prepare config", PrepareConfig), ("pretokenize config", PretokenizeConfig)):
        print(f"## {title}\n\n| key | type | default | meaning |\n|---|---|---|---|")
        for key, type_name, default, doc in describe(cls):
            cells = (f"`{key}`", type_name, f"`{default}`", doc)
            print("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")  # Literal types hold '|'
        print()


# ------------------------------------------------------------------ parser


def add_pipeline_arguments(parser: argparse.ArgumentParser, kind: str, strict_help: str) -> None:
    """The arguments of a data pipeline command (prepare, pretokenize)."""
    parser.add_argument("config", help=f"YAML {kind} config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--strict", action="store_true", help=strict_help)
    parser.add_argument("--overwrite", action="store_true",
                        help="build in place of a dataset made there with other settings: it is moved aside to OUTPUT.old-N, not deleted")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")


def build_parser() -> argparse.ArgumentParser:
    from trainer.entry import DESCRIPTION as TRAIN_DESCRIPTION, add_arguments as add_train_arguments

    parser = CommandLineParser(prog="tokfleet", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = sub.add_parser("prepare", help="turn a corpus into WebDataset shards + manifest (Ray Data)",
                             description="With Ray Data, turn source.kind text (train or load a BPE, pack token sequences), "
                                         "meg (MEG/EEG recordings via mne: filter, resample, normalised windows + sensor metadata) "
                                         "video (PyAV: resized clips), tokens (integer ids) or timeseries (CSV / Parquet tables: "
                                         "normalised context + target windows) into WebDataset shards with a manifest.json. "
                                         "Re-running builds only missing or stale shards; unusable inputs are skipped and listed.")
    add_pipeline_arguments(prepare, "prepare", strict_help="an unusable input (corrupt, truncated, empty) is an error, not skipped")
    prepare.set_defaults(func=cmd_prepare)

    train = sub.add_parser("train", help="train a model from a run config", description=TRAIN_DESCRIPTION)
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    generate = sub.add_parser("generate", help="sample text or token ids from a trained checkpoint",
                              description="Load a checkpoint (or a run dir's newest one) and continue a prompt (GPT): text "
                                          "(--prompt, through the run's tokenizer) or token ids (--prompt-tokens, printed as ids, "
                                          "one line per sample), or generate / reconstruct / encode with a latent model (TokCom, --mode).")
    generate.add_argument("--checkpoint", required=True, help="checkpoint folder, run dir or RUN_DIR/checkpoints/best")
    generate.add_argument("--prompt", default="", help="text to continue (empty: start from end-of-text)")
    generate.add_argument("--prompt-tokens", metavar="IDS",
                          help="token ids to continue instead of text, e.g. \"80 81 83\" (runs on token-id data need no tokenizer); "
                               "prints each sample's ids, prompt first, one line per sample")
    generate.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to generate")
    generate.add_argument("--temperature", type=non_negative_float, default=0.8, help="sampling temperature; 0 is greedy")
    generate.add_argument("--top-k", type=positive_int, default=50, help="sample among the k most likely tokens")
    generate.add_argument("--num-samples", type=positive_int, default=1, help="independent continuations")
    generate.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    generate.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    generate.add_argument("--mode", choices=("generate", "reconstruct", "encode"),
                          help="latent models (TokCom): generate from noise, reconstruct --input_text through the VAE, or "
                               "encode it to latents (default: the model's first mode)")
    generate.add_argument("--input_text", "--input-text", help="text to reconstruct or encode")
    generate.add_argument("--num_chunks", "--num-chunks", type=positive_int,
                          help="latents to generate, or chunks the input text is EOS-padded/truncated to (default: sequence_len / chunk_size)")
    generate.add_argument("--num_steps", "--num-steps", type=positive_int, default=50, help="Euler denoising steps (--mode generate)")
    generate.add_argument("--batch_size", "--batch-size", type=positive_int, default=1, help="sequences to generate (--mode generate)")
    generate.add_argument("--output_file", "--output-file",
                          help="write the texts (generate, reconstruct) or the latents as a torch .pt tensor (encode)")
    generate.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    generate.set_defaults(func=cmd_generate)

    inspect = sub.add_parser("inspect", help="summarise and verify a dataset or a checkpoint",
                             description="PATH is a dataset root (manifest.json: every shard is verified), "
                                         "a checkpoint folder or a run dir. Exit 1 when a shard fails verification.")
    inspect.add_argument("path", help="dataset root, checkpoint folder, run dir or RUN_DIR/checkpoints/best (or latest)")
    inspect.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    inspect.set_defaults(func=cmd_inspect)

    analysis = sub.add_parser("analyze", help="token statistics of a token dataset: usage, entropies, transitions, n-grams, outliers",
                              description="Streams the shards of any token dataset (text, token ids, MEG/EEG or video codes) "
                                          "twice: counts, then each sample's likelihood under the data's own unigram/bigram model. "
                                          "Writes analysis.json and PNGs (usage, transition heatmap, sample likelihoods, per "
                                          "channel/level for code grids).")
    analysis.add_argument("dataset", help="dataset root (manifest.json), local or s3://")
    analysis.add_argument("--out", help="report folder (default: DATASET/analysis for a local dataset)")
    analysis.add_argument("--split", choices=("train", "val", "all"), default="train", help="which shards (default: train)")
    analysis.add_argument("--outliers", type=positive_int, default=10, help="samples listed per outlier kind (default 10)")
    analysis.add_argument("--max-patterns", type=positive_int, default=2048,
                          help="candidate 3/4-grams kept per shard and order while counting (default 2048); the most "
                               "frequent are recounted exactly and the report bounds any n-gram left out")
    analysis.add_argument("--no-plots", action="store_true", help="write analysis.json only (no PNGs)")
    analysis.add_argument("--ray", action="store_true", help="run the per-shard work as Ray tasks (a local instance unless --ray-address)")
    analysis.add_argument("--ray-address", help="join this Ray cluster (implies --ray)")
    analysis.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    analysis.set_defaults(func=cmd_analyze)

    export = sub.add_parser("export", help="consolidate a checkpoint (ZeRO / FSDP shards too) into one safetensors model",
                            description="Writes OUT/model.safetensors (fp32, whole tensors), the model spec and the tokenizer: a "
                                        "single-device checkpoint that `tokfleet generate --checkpoint OUT` loads. Needs no GPU.")
    export.add_argument("checkpoint", help="checkpoint folder, run dir (its newest complete checkpoint) or RUN_DIR/checkpoints/best")
    export.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    export.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    export.set_defaults(func=cmd_export)

    pretokenize = sub.add_parser("pretokenize", help="run a trained tokenizer over raw MEG/EEG or video shards -> token shards (Ray Data actors)",
                                 description="A pool of Ray Data actors, each holding the tokenizer checkpoint (TOTEM, BrainOmni, "
                                             "BrainTokMix, Vidtok, VidtokRVQ), turns a `tokfleet prepare` dataset into token shards "
                                             "(same sample keys) with a manifest.json recording the tokenizer's provenance. "
                                             "Re-running builds only missing or stale shards.")
    add_pipeline_arguments(pretokenize, "pretokenize", strict_help="a missing or changed raw shard is an error, not skipped")
    pretokenize.set_defaults(func=cmd_pretokenize)

    evaluation = sub.add_parser("eval", help="a causal model's next-token metrics, a classifier's accuracy and confusion matrix, "
                                "a tokenizer's codebook and reconstruction quality, or a signal model's forecast / reconstruction metrics",
                                description="A causal sequence model (gpt, FlatGPT*, BrainOmniCausalForecast): mean cross-entropy "
                                            "(nats), perplexity, next-token and top-5 accuracy, overall and per RVQ level, next to "
                                            "the unigram baseline of the same targets, on the first batches of a split of token "
                                            "shards (or raw windows/clips its tokenizer codes on the fly). A tokenizer checkpoint: "
                                            "codebook utilisation, perplexity, token entropy (bits), normalised reconstruction MSE "
                                            "and scale error on a raw dataset, against the seed's TOTEM goals. A continuous-signal "
                                            "model (BENDRForecast, NTD, MEGFactorizedAutoencoder): MSE, correlation and PSD distance "
                                            "(dB) of its forecast / reconstruction of raw windows, next to a naive baseline. A classifier: accuracy, "
                                            "balanced accuracy and the confusion matrix on labelled windows (also as a PNG: beside "
                                            "--out, else in the run's plots/). Printed as a table, "
                                            "written as JSON with --out.")
    evaluation.add_argument("checkpoint", help="checkpoint folder, run dir (its newest complete checkpoint) or RUN_DIR/checkpoints/best")
    evaluation.add_argument("--data", required=True, help="dataset root: token shards of the model's kind, grid and vocabulary "
                                                          "(a causal model), or raw MEG/EEG windows or video clips (a tokenizer)")
    evaluation.add_argument("--split", default="val", help="manifest split")
    evaluation.add_argument("--num-batches", type=positive_int, default=8,
                            help="batches to evaluate: the split's first ones, shards in manifest order (default 8)")
    evaluation.add_argument("--batch-size", type=positive_int, default=8, help="samples per batch (neighbours of one shape)")
    evaluation.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    evaluation.add_argument("--out", help="write the report as JSON here")
    evaluation.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    evaluation.set_defaults(func=cmd_eval)

    forecast = sub.add_parser("forecast", help="forecast held-out MEG/EEG windows or video clips with a forecaster + its tokenizer",
                              description="Tokenize the context of held-out raw windows, generate the next code steps with a "
                                          "forecaster trained on token shards (KV cache), decode them with the tokenizer, undo "
                                          "RevIN and prepare's normalisation, and score the forecast against the true continuation "
                                          "and naive baselines (persistence, context mean, last period). A time-series model "
                                          "(task series_forecast) forecasts held-out windows of a timeseries dataset directly. "
                                          "Writes OUT/forecast.json "
                                          "and plots (video: a frame strip and forecast.mp4).")
    forecast.add_argument("forecaster", help="forecaster run dir or checkpoint (a sequence model trained on token shards, "
                                             "or a series_forecast model on time-series windows)")
    forecast.add_argument("--tokenizer", help="tokenizer run dir or checkpoint (default: the one the forecaster's codes came from)")
    forecast.add_argument("--data", help="raw dataset root (`tokfleet prepare` output) to take held-out windows from "
                                         "(a time-series model: default the dataset it trained on)")
    forecast.add_argument("--recording", help="a MEG/EEG recording file instead, preprocessed as --data (or the tokenizer's dataset)")
    forecast.add_argument("--split", default="val", help="manifest split of --data")
    forecast.add_argument("--num-windows", type=positive_int, default=4, help="windows (clips) to forecast")
    forecast.add_argument("--context", type=positive_int, help="context length in samples (frames); default: the window minus the horizon")
    forecast.add_argument("--horizon", type=positive_int, help="samples (frames) to forecast; default: a quarter of the window")
    forecast.add_argument("--num-samples", type=positive_int, default=1, help="forecasts per window (sampled; with --temperature > 0)")
    forecast.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature; 0 is greedy")
    forecast.add_argument("--top-k", type=positive_int, help="sample among the k most likely codes")
    forecast.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    forecast.add_argument("--out", default="forecast", help="output folder for forecast.json and the plots")
    forecast.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    forecast.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    forecast.set_defaults(func=cmd_forecast)

    models = sub.add_parser("models", help="list registered models and flavors with parameter counts",
                            description="Every registered model_name and flavor, built on the meta device to count parameters.")
    models.set_defaults(func=cmd_models)

    reference = sub.add_parser("config-reference", help="print every config key with its type, default and meaning",
                               description="The config reference as Markdown tables.")
    reference.set_defaults(func=cmd_config_reference)

    demo = sub.add_parser("demo", help="the end-to-end demos: text (stdlib -> BPE -> Ray shards -> GPT -> resume -> sample) "
                                       "or meg (synthetic MEG -> TOTEM -> tokens -> GPT forecaster -> forecast)",
                          description="Runs a job end to end on this machine (local shards, local Ray, CPU). text (default, "
                                      "`make demo`): the main job, ~8 min; meg: the forecasting chain on synthetic MEG, ~10 min.")
    demo.add_argument("which", nargs="?", choices=("text", "meg"), default="text", help="which demo (default: text)")
    demo.add_argument("--workdir", default="demo", help="folder for the datasets and the runs")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a train config value (repeatable)")
    demo.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    demo.set_defaults(func=cmd_demo)

    from launch.submit import add_parsers as add_submit_parsers

    add_submit_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    is_debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        with exit_on_missing_package(f"tokfleet {args.command}", is_debug):  # an extra's package (deepspeed, mne, ...)
            args.func(args)
    except KeyboardInterrupt:  # Ctrl-C where no command handles it (start-up, loading): one line, no traceback
        if is_debug:
            raise
        stop_at_once("tokfleet: interrupted")  # at once: a second Ctrl-C during a normal exit would end it by the signal


if __name__ == "__main__":
    main()
