"""RETRO hyper-parameters: one typed config, checked when it is built and again against the base it is fitted to."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


CCA_INITS = ("copy", "zero")
ATTENTIONS = ("separate", "joint")


@dataclass(frozen=True)
class RetroConfig:
    """What retro-fitting adds to a pretrained decoder.

    `cca_layers` are 0-based decoder layer indices (the names HF uses, e.g. `model.layers.5`). `None` means the top
    layers of the decoder (see `default_cca_layers`, which explains why not RETRO's every-3rd-layer rule). Widths and head counts left as `None` follow the decoder.
    """

    chunk_size: int = 64  # m
    num_neighbours: int = 2  # K
    neighbour_length: int | None = None  # R; None -> 2 * chunk_size (chunk + its continuation)
    cca_layers: tuple[int, ...] | None = None
    encoder_layers: int = 2  # separate: layers of the bidirectional neighbour encoder
    encoder_width: int | None = None  # None -> decoder width
    encoder_heads: int | None = None  # None -> decoder heads (or a divisor of encoder_width)
    cca_heads: int | None = None  # None -> decoder heads
    encoder_mlp_ratio: int = 4  # separate: the encoder's MLP width over its model width
    dropout: float = 0.0  # dropout in CCA and the neighbour encoder
    # How a CCA block starts; both keep the retro-fitted model exact at step 0.
    # "copy": value and output projections start as the identity, so the branch is a ready path from the neighbours'
    #   token embeddings into the residual stream, held shut by a zero gate that training opens (give the gates a
    #   high learning rate: `train.lr_scales: {gate: ...}`). Needs encoder_width == decoder width.
    # "zero": output projection zero, gate open; everything is learned from scratch.
    cca_init: str = "copy"
    # How CCA reads (retro/joint.py explains "joint"):
    # "separate": CCA blocks with their own softmax over neighbours encoded by a trained bidirectional encoder
    #   (RETRO's design; the encoder_* and cca_* fields above apply).
    # "joint": the frozen decoder encodes the neighbours, and each CCA layer's queries attend them in the same
    #   softmax as their own context through projections that start as the layer's own, behind a zero gate per
    #   head: reading starts from the pretrained attention. Llama-style decoders; CCA on every layer by default.
    attention: str = "separate"
    # attention="joint": how many of the frozen decoder's lower layers the neighbours pass. A CCA layer below this
    # depth reads the neighbours' states at its own input (what the layer would see in its context); a layer at or
    # above it reads the states the prefix ends with, through its own projections (trained). None: up to the highest
    # CCA layer, so every layer reads its own states. The neighbours' forward costs this depth over the decoder's.
    neighbour_depth: int | None = None

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"RetroConfig: {msg}")

        need(isinstance(self.chunk_size, int) and self.chunk_size >= 1,
             f"chunk_size must be a positive int (RETRO uses 64), got {self.chunk_size!r}")
        need(isinstance(self.num_neighbours, int) and self.num_neighbours >= 1,
             f"num_neighbours must be >= 1, got {self.num_neighbours!r}")
        if self.neighbour_length is None:
            object.__setattr__(self, "neighbour_length", 2 * self.chunk_size)
        need(isinstance(self.neighbour_length, int) and self.neighbour_length >= 1,
             f"neighbour_length must be a positive int (2 * chunk_size for chunk + continuation), "
             f"got {self.neighbour_length!r}")
        if self.cca_layers is not None:
            layers = tuple(int(i) for i in self.cca_layers)
            need(len(layers) >= 1, "cca_layers is empty; give at least one 0-based layer index or None for the default")
            need(all(i >= 0 for i in layers), f"cca_layers are 0-based layer indices and must be >= 0, got {layers}")
            need(len(set(layers)) == len(layers), f"cca_layers has duplicates: {layers}")
            object.__setattr__(self, "cca_layers", tuple(sorted(layers)))
        need(isinstance(self.encoder_layers, int) and self.encoder_layers >= 1,
             f"encoder_layers must be >= 1 (RETRO uses 2), got {self.encoder_layers!r}")
        for name in ("encoder_width", "encoder_heads", "cca_heads"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and v >= 1), f"{name} must be a positive int or None, got {v!r}")
        if self.encoder_width is not None and self.encoder_heads is not None:
            need(self.encoder_width % self.encoder_heads == 0,
                 f"encoder_width {self.encoder_width} is not divisible by encoder_heads {self.encoder_heads}")
        need(isinstance(self.encoder_mlp_ratio, int) and self.encoder_mlp_ratio >= 1,
             f"encoder_mlp_ratio must be a positive int, got {self.encoder_mlp_ratio!r}")
        need(0.0 <= float(self.dropout) < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        need(self.cca_init in CCA_INITS, f"cca_init must be one of {CCA_INITS}, got {self.cca_init!r}")
        need(self.attention in ATTENTIONS, f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.neighbour_depth is not None:
            need(self.attention == "joint", "neighbour_depth applies to attention='joint' only (the separate design "
                 "encodes neighbours with its own encoder: set encoder_layers)")
            need(isinstance(self.neighbour_depth, int) and self.neighbour_depth >= 1,
                 f"neighbour_depth must be a positive int (decoder layers the neighbours pass), "
                 f"got {self.neighbour_depth!r}")

    def resolved(self, n_layers: int, hidden: int, heads: int) -> "RetroConfig":
        """This config with every `None` filled in for a decoder of `n_layers` layers, width `hidden`, `heads` heads."""
        if self.cca_layers is not None:
            layers = self.cca_layers
        else:
            layers = tuple(range(n_layers)) if self.attention == "joint" else default_cca_layers(n_layers)
        bad = [i for i in layers if i >= n_layers]
        if self.neighbour_depth is not None and self.neighbour_depth > n_layers:
            raise ValueError(f"RetroConfig.neighbour_depth {self.neighbour_depth} exceeds the decoder's {n_layers} "
                             f"layers")
        if bad:
            raise ValueError(f"RetroConfig.cca_layers {bad} do not exist: the decoder has {n_layers} layers "
                             f"(valid 0-based indices 0..{n_layers - 1})")
        width = self.encoder_width or hidden
        enc_heads = self.encoder_heads or _largest_divisor_at_most(width, heads)
        cca_heads = self.cca_heads or heads
        if hidden % cca_heads:
            raise ValueError(f"RetroConfig.cca_heads {cca_heads} does not divide the decoder width {hidden}")
        if width % enc_heads:
            raise ValueError(f"RetroConfig.encoder_heads {enc_heads} does not divide encoder_width {width}")
        return dataclasses.replace(self, cca_layers=tuple(layers), encoder_width=width, encoder_heads=enc_heads,
                                   cca_heads=cca_heads)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["cca_layers"] is not None:
            d["cca_layers"] = list(d["cca_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RetroConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"RetroConfig: unknown fields {sorted(unknown)}; known fields are {sorted(known)}")
        d = dict(d)
        if d.get("cca_layers") is not None:
            d["cca_layers"] = tuple(d["cca_layers"])
        return cls(**d)


def default_cca_layers(n_layers: int) -> tuple[int, ...]:
    """0-based layers that get chunked cross-attention when retro-fitting.

    Deep decoders (>= 12 layers) get CCA on their top ceil(n/8) layers (at least 2): 30 layers -> 0-based 26..29.
    Borgeaud et al. (2022) place CCA on every 3rd layer from the 6th, but they train the whole model; beside a frozen
    decoder, CCA near the top reads its neighbours into states the LM head uses directly, and on the key -> value
    copy task (benchmarks/bench_copy_task.py) the top 4 layers of SmolLM2 learned to read where RETRO's rule
    (9 layers from the 6th) did not within the same steps. Shallower decoders start at the middle layer and use
    every layer (<= 7 layers) or every 2nd (8..11 layers): a 4-layer decoder gets 0-based layers 1, 2, 3.
    """
    if n_layers < 1:
        raise ValueError(f"a decoder needs at least one layer, got {n_layers}")
    if n_layers >= 12:
        top = max(2, -(-n_layers // 8))
        return tuple(range(n_layers - top, n_layers))
    start, step = max(1, (n_layers + 1) // 2), (1 if n_layers < 8 else 2)
    return tuple(i - 1 for i in range(start, n_layers + 1, step))


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for h in range(min(n, cap), 0, -1):
        if n % h == 0:
            return h
    return 1
