"""Flat tokenizers: continuous multichannel signals (B, T, C) <-> token ids, with no learned weights.

FlatGPT models signals that no learned tokenizer has compressed by quantising each sample of
each channel and flattening the grid. Three ways, chosen by a string (`tok_class`) and its
arguments (`tok_args`):

- AmplitudeTokenizer: one token per sample: clip the normalised amplitude to [-max_abs, max_abs],
  compand it (mu-law) or not (uniform), and cut [-1, 1] into num_bins equal bins. Ids 0..num_bins-1,
  codes keep the signal's shape (B, T, C).
- DelimitedTokenizer: amplitude tokens laid out time-major with a delimiter token closing every
  timestep (and optionally one between channels), so a sequence model sees where a timestep ends:
  (B, T * (C + 1)) or (B, T * 2C).
- BPETokenizer: amplitude bins written as one character each and compressed with a byte-pair
  encoding (HF `tokenizers`) trained on signals: each "word" is one channel's run of group_size
  consecutive samples, so merges learn temporal motifs shared by all channels. Variable length:
  batches are right-padded with the pad id 0.

Inputs are float signals, already normalised (e.g. z-scored per channel); integer inputs to the
Delimited and BPE tokenizers are taken as amplitude codes already quantised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch

QUANTISATION_METHODS = ("mu_law", "uniform")


class AmplitudeTokenizer:
    """Uniform or mu-law quantisation of amplitudes: (...) float <-> (...) int64 in [0, num_bins).

    Round trip: the bin centre is at most half a bin (1 / num_bins in companded units) away, so
    |decode(encode(x)) - x| <= max_abs / num_bins (uniform) or
    (|x| + max_abs / mu) * ((1 + mu) ** (1 / num_bins) - 1) (mu-law: finer near zero), for |x| <= max_abs.
    """

    def __init__(self, num_bins: int = 256, method: str = "mu_law", mu: float = 255.0, max_abs: float = 1.0):
        if num_bins < 2:
            raise ValueError(f"tok_args.num_bins must be >= 2, got {num_bins}")
        if method not in QUANTISATION_METHODS:
            raise ValueError(f"tok_args.method must be one of {QUANTISATION_METHODS}, got {method!r}")
        if mu <= 0 or max_abs <= 0:
            raise ValueError(f"tok_args.mu and tok_args.max_abs must be > 0, got {mu} and {max_abs}")
        self.num_bins, self.method, self.mu, self.max_abs = int(num_bins), method, float(mu), float(max_abs)

    @property
    def vocab_size(self) -> int:
        return self.num_bins

    def args(self) -> dict:
        return {"num_bins": self.num_bins, "method": self.method, "mu": self.mu, "max_abs": self.max_abs}

    def encode(self, signal: torch.Tensor) -> torch.Tensor:
        if not signal.is_floating_point():
            raise ValueError(f"AmplitudeTokenizer encodes float signals, got {signal.dtype}")
        x = (signal.double() / self.max_abs).clamp(-1.0, 1.0)
        if self.method == "mu_law":
            x = torch.sign(x) * torch.log1p(self.mu * x.abs()) / math.log1p(self.mu)
        codes = torch.floor((x + 1.0) / 2.0 * self.num_bins)
        return codes.clamp(0, self.num_bins - 1).long()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Bin centres, expanded back to amplitudes; same shape as codes, float32."""
        y = (codes.double() + 0.5) / self.num_bins * 2.0 - 1.0
        if self.method == "mu_law":
            y = torch.sign(y) * torch.expm1(y.abs() * math.log1p(self.mu)) / self.mu
        return (y * self.max_abs).float()

    def codes_of(self, signal: torch.Tensor) -> torch.Tensor:
        """Amplitude codes of a float signal; integer input is taken as codes already (checked)."""
        if signal.is_floating_point():
            return self.encode(signal)
        if signal.numel() and (signal.min() < 0 or signal.max() >= self.num_bins):
            raise ValueError(f"amplitude codes must lie in [0, {self.num_bins}), got [{signal.min()}, {signal.max()}]")
        return signal.long()


class DelimitedTokenizer:
    """Amplitude tokens, time-major, each timestep closed by `delimiter_id`; with
    `channel_delimiter_id`, that token also separates consecutive channels of a timestep.

    (B, T, C) -> (B, T * (C + 1)) or (B, T * 2C). Delimiter ids default to the ids right after the
    amplitude bins.
    """

    def __init__(self, num_bins: int = 256, method: str = "mu_law", mu: float = 255.0, max_abs: float = 1.0,
                 delimiter_id: int | None = None, channel_delimiter_id: int | None = None,
                 use_channel_delimiter: bool = False):
        self.amplitude = AmplitudeTokenizer(num_bins, method, mu, max_abs)
        self.delimiter_id = num_bins if delimiter_id is None else int(delimiter_id)
        if use_channel_delimiter or channel_delimiter_id is not None:
            self.channel_delimiter_id = (self.delimiter_id + 1) if channel_delimiter_id is None else int(channel_delimiter_id)
        else:
            self.channel_delimiter_id = None
        for name, value in (("delimiter_id", self.delimiter_id), ("channel_delimiter_id", self.channel_delimiter_id)):
            if value is not None and value < num_bins:
                raise ValueError(f"tok_args.{name} ({value}) collides with an amplitude bin (< num_bins = {num_bins})")
        if self.channel_delimiter_id == self.delimiter_id:
            raise ValueError("tok_args.channel_delimiter_id must differ from delimiter_id")

    @property
    def vocab_size(self) -> int:
        return max(self.delimiter_id, self.channel_delimiter_id or 0) + 1

    def tokens_per_step(self, num_channels: int) -> int:
        return 2 * num_channels if self.channel_delimiter_id is not None else num_channels + 1

    def encode(self, signal: torch.Tensor) -> torch.Tensor:
        codes = self.amplitude.codes_of(signal)  # (B, T, C)
        B, T, C = codes.shape
        if self.channel_delimiter_id is not None:
            separators = codes.new_full((B, T, C, 1), self.channel_delimiter_id)
            separators[:, :, -1] = self.delimiter_id
            return torch.cat([codes[..., None], separators], dim=-1).reshape(B, T * 2 * C)
        delimiters = codes.new_full((B, T, 1), self.delimiter_id)
        return torch.cat([codes, delimiters], dim=-1).reshape(B, T * (C + 1))

    def strip(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) delimited tokens of whole timesteps -> (B, T, C) amplitude codes; checks the layout."""
        B, L = tokens.shape
        ends = (tokens[0] == self.delimiter_id).nonzero()
        if len(ends) == 0:
            raise ValueError("no timestep delimiter in the tokens")
        per_step = int(ends[0]) + 1
        if L % per_step != 0:
            raise ValueError(f"{L} tokens are not whole timesteps of {per_step} tokens")
        steps = tokens.reshape(B, L // per_step, per_step)
        if self.channel_delimiter_id is not None:
            num_channels = per_step // 2
            expected = torch.full((per_step // 2,), self.channel_delimiter_id, device=tokens.device)
            expected[-1] = self.delimiter_id
            if not torch.equal(steps[..., 1::2], expected.expand_as(steps[..., 1::2])):
                raise ValueError("delimiters are not where the layout puts them")
            return steps[..., 0::2].reshape(B, -1, num_channels)
        if not torch.all(steps[..., -1] == self.delimiter_id) or torch.any(steps[..., :-1] >= self.amplitude.num_bins):
            raise ValueError("delimiters are not where the layout puts them")
        return steps[..., :-1]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.amplitude.decode(self.strip(tokens))


class BPETokenizer:
    """Byte-pair encoding over amplitude symbols (HF `tokenizers`): (B, T, C) <-> (B, L) padded ids.

    Bin k is written as the character chr(SYMBOL_BASE + k) (printable, never whitespace). A signal
    becomes words of group_size characters: for each block of group_size timesteps, one word per
    channel. Train with `train(signals, vocab_size)`, persist with `save(folder)`, reload with
    BPETokenizer(tokenizer_path=folder).
    """

    SYMBOL_BASE = 0x4E00  # CJK Unified Ideographs: 20k printable symbols
    PAD_TOKEN = "<pad>"
    CONFIG_FILE = "flat_tokenizer.json"
    TOKENIZER_FILE = "tokenizer.json"

    def __init__(self, num_bins: int = 256, method: str = "mu_law", mu: float = 255.0, max_abs: float = 1.0,
                 group_size: int = 4, num_channels: int | None = None, tokenizer_path: str | None = None):
        self.tokenizer = None
        if tokenizer_path is not None:
            saved = json.loads((Path(tokenizer_path) / self.CONFIG_FILE).read_text())
            if saved.get("class") != "BPETokenizer":
                raise ValueError(f"tokenizer_path {tokenizer_path} holds a {saved.get('class')!r}, not a BPETokenizer")
            num_bins, method, mu, max_abs = saved["num_bins"], saved["method"], saved["mu"], saved["max_abs"]
            group_size, num_channels = saved["group_size"], saved["num_channels"]
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_path) / self.TOKENIZER_FILE))
        if num_bins > 20000:
            raise ValueError(f"tok_args.num_bins ({num_bins}) exceeds the 20000 amplitude symbols")
        if group_size < 1:
            raise ValueError(f"tok_args.group_size must be >= 1, got {group_size}")
        self.amplitude = AmplitudeTokenizer(num_bins, method, mu, max_abs)
        self.group_size = int(group_size)
        self.num_channels = num_channels
        self._strings: list[str] | None = None

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def vocab_size(self) -> int:
        self._require_trained()
        return self.tokenizer.get_vocab_size()

    def _require_trained(self) -> None:
        if self.tokenizer is None:
            raise ValueError("BPETokenizer is not trained: call train(...) or pass tokenizer_path")

    def _words(self, codes_TC: torch.Tensor) -> str:
        T, C = codes_TC.shape
        if T % self.group_size != 0:
            raise ValueError(f"BPETokenizer: T ({T}) must be a multiple of group_size ({self.group_size})")
        groups = codes_TC.reshape(T // self.group_size, self.group_size, C).permute(0, 2, 1)  # (blocks, C, group)
        base = self.SYMBOL_BASE
        return " ".join("".join(chr(base + int(k)) for k in word) for word in groups.reshape(-1, self.group_size).tolist())

    def train(self, signals: Iterable[torch.Tensor], vocab_size: int) -> "BPETokenizer":
        """Learn merges from signals, each (T, C) or (B, T, C), float or amplitude codes."""
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        def texts():
            for signal in signals:
                codes = self.amplitude.codes_of(signal)
                for sample in (codes if codes.dim() == 3 else codes[None]):
                    if self.num_channels is None:
                        self.num_channels = sample.size(1)
                    yield self._words(sample)

        alphabet = [chr(self.SYMBOL_BASE + k) for k in range(self.amplitude.num_bins)]
        if vocab_size < len(alphabet) + 1:
            raise ValueError(f"vocab_size ({vocab_size}) must exceed num_bins + 1 ({len(alphabet) + 1})")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[self.PAD_TOKEN], initial_alphabet=alphabet,
                                      limit_alphabet=len(alphabet), show_progress=False)
        tokenizer.train_from_iterator(texts(), trainer)
        assert tokenizer.token_to_id(self.PAD_TOKEN) == self.pad_id
        self.tokenizer, self._strings = tokenizer, None
        return self

    def save(self, folder: str | Path) -> Path:
        self._require_trained()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / self.TOKENIZER_FILE))
        config = {"class": "BPETokenizer", **self.amplitude.args(), "group_size": self.group_size,
                  "num_channels": self.num_channels}
        (folder / self.CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return folder

    def encode(self, signal: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, L) ids, right-padded with pad_id to the longest sample."""
        self._require_trained()
        codes = self.amplitude.codes_of(signal)
        encodings = self.tokenizer.encode_batch([self._words(sample) for sample in codes])
        length = max(len(e.ids) for e in encodings)
        out = torch.full((len(encodings), length), self.pad_id, dtype=torch.long)
        for row, encoding in enumerate(encodings):
            out[row, : len(encoding.ids)] = torch.tensor(encoding.ids, dtype=torch.long)
        return out

    def decode_codes(self, ids: torch.Tensor, num_channels: int | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, T, C) amplitude codes; pads are skipped, a trailing partial block dropped."""
        self._require_trained()
        num_channels = num_channels or self.num_channels
        if not num_channels:
            raise ValueError("BPETokenizer.decode needs num_channels (not recorded at training)")
        if self._strings is None:
            vocab = self.tokenizer.get_vocab()
            self._strings = [""] * len(vocab)
            for token, index in vocab.items():
                self._strings[index] = "" if token == self.PAD_TOKEN else token
        block = num_channels * self.group_size
        rows = []
        for row in ids.tolist():
            text = "".join(self._strings[i] for i in row)
            text = text[: len(text) // block * block]
            codes = torch.tensor([ord(ch) - self.SYMBOL_BASE for ch in text], dtype=torch.long)
            blocks = codes.reshape(-1, num_channels, self.group_size)  # (blocks, C, group)
            rows.append(blocks.permute(0, 2, 1).reshape(-1, num_channels))
        num_steps = min(r.size(0) for r in rows)
        return torch.stack([r[:num_steps] for r in rows])

    def decode(self, ids: torch.Tensor, num_channels: int | None = None) -> torch.Tensor:
        return self.amplitude.decode(self.decode_codes(ids, num_channels))


TOKENIZERS = {"AmplitudeTokenizer": AmplitudeTokenizer, "DelimitedTokenizer": DelimitedTokenizer,
              "BPETokenizer": BPETokenizer}


def build_flat_tokenizer(tok_class: str | None, tok_args: dict, vocab_size: int, tokenizer_path: str | None = None):
    """The tokenizer `tok_class(**tok_args)`, or the one saved at tokenizer_path; None without either.

    num_bins defaults to what the model's vocabulary leaves for amplitude bins.
    """
    if tok_class is None and tokenizer_path is not None and (Path(tokenizer_path) / BPETokenizer.CONFIG_FILE).is_file():
        # (any other tokenizer_path is a learned tokenizer's run: it tokenizes outside the model, trainer/token_tasks.py)
        tok_class = json.loads((Path(tokenizer_path) / BPETokenizer.CONFIG_FILE).read_text()).get("class")
    if tok_class is None:
        return None
    if tok_class not in TOKENIZERS:
        raise ValueError(f"tok_class: unknown flat tokenizer {tok_class!r}; valid: {', '.join(TOKENIZERS)}")
    args = dict(tok_args)
    if tok_class == "BPETokenizer":
        if tokenizer_path is None:
            raise ValueError("tokenizer_path: BPETokenizer needs a trained tokenizer folder (BPETokenizer(...).train(...).save(folder))")
        args["tokenizer_path"] = tokenizer_path
    elif tok_class == "DelimitedTokenizer":
        num_special = 2 if args.get("use_channel_delimiter") or args.get("channel_delimiter_id") is not None else 1
        args.setdefault("num_bins", vocab_size - num_special)
    else:
        args.setdefault("num_bins", vocab_size)
    try:
        tokenizer = TOKENIZERS[tok_class](**args)
    except TypeError as error:
        raise ValueError(f"tok_args for {tok_class}: {error}") from None
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"vocab_size ({vocab_size}) is smaller than the {tok_class}'s {tokenizer.vocab_size} token ids")
    return tokenizer
