"""Retro-fit a pretrained Hugging Face causal LM with chunked cross-attention over retrieved neighbours.

Takes a loaded decoder (Llama, GPT-2, GPT-NeoX families) and a `RetroConfig`; gives a `RetroModel` whose forward runs
the HF model's own forward (its attention implementation, its KV cache) with CCA blocks hooked onto the outputs of the
chosen layers. Base weights are frozen and untouched: `base.state_dict()` keeps its keys.
Legend: B batch, T tokens, L chunks, K neighbours, R neighbour length, D decoder width, E encoder width, m chunk size.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import RetroConfig
from .joint import JointBinding, JointCCA, attention_modules, implementation_name
from .layers import ChunkedCrossAttention, NeighbourEncoder


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of an HF causal LM (`model.layers`, `transformer.h`, `gpt_neox.layers`)."""
    body = getattr(base, "base_model", base)
    for name in ("layers", "h", "blocks", "block"):
        mods = getattr(body, name, None)
        if isinstance(mods, nn.ModuleList) and len(mods) > 0:
            return mods
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}: expected a ModuleList named "
                     f"layers/h/blocks on its base model; supported families are Llama, GPT-2 and GPT-NeoX")


@dataclass
class _RetroState:
    """What CCA needs from earlier steps of a cached forward; it travels with the KV cache as `cache.retro_state`."""

    offset: int = 0  # absolute position of the next token (padding included)
    pending: torch.Tensor | None = None  # (B, offset - L_enc*m, D) first-CCA-layer states of the unfinished chunk
    encoded: torch.Tensor | None = None  # (B, L_enc, K*R, E) encoded neighbours of finished chunks
    encoded_valid: torch.Tensor | None = None  # (B, L_enc, K*R) bool
    neighbour_length: int | None = None  # R
    with_neighbours: bool | None = None
    cca_kv: dict = field(default_factory=dict)  # layer -> {"k", "v"}: (B, L_enc, K*R, D) projected per CCA block
    last_token: torch.Tensor | None = None  # (B, 1, D) input embedding of the token at offset - 1
    joint_chunks: int = 0  # attention="joint": chunks whose neighbours are encoded (their keys are in cca_kv)
    joint_reads: bool = False  # attention="joint": some encoded chunk has a real neighbour (else CCA reads nothing)


@dataclass
class _Step:
    state: _RetroState
    neighbours: torch.Tensor  # (B, L, K, R)
    attention_mask: torch.Tensor | None  # (B, offset + n) or None
    n: int  # new tokens in this forward
    tokens: torch.Tensor | None = None  # (B, n, D) input embeddings of the new tokens (CCA's induction path)
    previous: torch.Tensor | None = None  # (B, n, D) input embeddings of the tokens before them (zeros at the start)
    cached: bool = False  # a KV cache carries state across forwards


class _CCAHook:
    """The forward hook of one CCA layer. An object holding (model, layer) rather than a closure, so that
    `copy.deepcopy` rebinds it to the copy (deepcopy maps the model to its copy) and pickle/`torch.save` can store it."""

    def __init__(self, model: "RetroModel", layer: int):
        self.model, self.layer = model, layer

    def __call__(self, module, args, output):
        return self.model._make_hook(self.layer)(module, args, output)


class _LayerInput:
    """A forward pre-hook that keeps a decoder layer's input hidden states in `store[layer]`."""

    def __init__(self, store: dict, layer: int):
        self.store, self.layer = store, layer

    def __call__(self, module, args, kwargs):
        self.store[self.layer] = args[0] if args else kwargs["hidden_states"]


class _NeighboursEncoded(Exception):
    """Raised on entering the first decoder layer above the highest CCA layer: the neighbours' states are complete."""


def _stop_encoding(module, args):
    raise _NeighboursEncoded


class _NeighbourStates:
    """Decoder states of neighbour rows, by their token ids: what `RetroModel.reusing_neighbours` keeps."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used, self.rows = max_bytes, 0, {}  # row bytes -> {layer: (R, D)}

    def lookup(self, rows: torch.Tensor, encode) -> dict[int, torch.Tensor]:
        """rows (U, R) -> {layer: (U, R, D)}; `encode` runs the rows not kept yet (the same mapping)."""
        keys = [row.tobytes() for row in rows.cpu().numpy()]
        missing = [j for j, key in enumerate(keys) if key not in self.rows]
        fresh = encode(rows[missing]) if missing else {}
        found = {keys[j]: {i: s[n] for i, s in fresh.items()} for n, j in enumerate(missing)}
        for key, states in found.items():
            size = sum(s.numel() * s.element_size() for s in states.values())
            if self.used + size <= self.max_bytes:
                self.rows[key], self.used = states, self.used + size
        pick = [self.rows.get(key) or found[key] for key in keys]
        return {i: torch.stack([p[i] for p in pick]) for i in pick[0]}


class RetroModel(nn.Module):
    """A frozen HF causal LM plus a neighbour encoder (`encoder`) and gated CCA blocks (`cca[str(layer)]`)."""

    def __init__(self, base: nn.Module, config: RetroConfig):
        super().__init__()
        text_cfg = base.config.get_text_config()
        hidden, n_layers, heads = text_cfg.hidden_size, text_cfg.num_hidden_layers, text_cfg.num_attention_heads
        config = config.resolved(n_layers, hidden, heads)
        self.base = base
        self.config = config
        for p in base.parameters():
            p.requires_grad_(False)
        emb = base.get_input_embeddings().weight
        self._step: _Step | None = None
        self._checkpointing: dict | None = None  # torch.utils.checkpoint kwargs while gradient checkpointing is on
        self._hooks, self._joint_original = [], None
        self._neighbour_states: _NeighbourStates | None = None  # joint CCA's encodings while `reusing_neighbours`
        layers = decoder_layers(base)
        if config.attention == "joint":
            # the frozen decoder encodes the neighbours; CCA reads them inside each chosen layer's own attention
            attns = attention_modules(layers)
            kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
            self.encoder = nn.Module()
            self.cca = nn.ModuleDict({str(i): JointCCA(attns[i], heads, kv_heads) for i in config.cca_layers})
            self.cca.to(device=emb.device)
            self._bind_joint(attns)
            return
        self.encoder = NeighbourEncoder(emb.shape[1], hidden, config.encoder_width, config.encoder_layers,
                                        config.encoder_heads, config.neighbour_length, config.encoder_mlp_ratio,
                                        config.dropout)
        self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(hidden, config.encoder_width, config.cca_heads,
                                                                config.dropout, config.cca_init)
                                  for i in config.cca_layers})
        self.encoder.to(device=emb.device, dtype=emb.dtype)
        self.cca.to(device=emb.device, dtype=emb.dtype)
        self._hooks = [layers[i].register_forward_hook(_CCAHook(self, i)) for i in config.cca_layers]

    def _bind_joint(self, attns: list[nn.Module]) -> None:
        """Run the base under the joint attention implementation, each CCA layer's attention bound to this model."""
        self._joint_original = self.base.config._attn_implementation
        self.base.config._attn_implementation = implementation_name(self._joint_original)
        for i in self.config.cca_layers:
            attns[i]._retro_joint = JointBinding(self, i, self._joint_original.removeprefix("retro_joint_"))

    @property
    def neighbour_depth(self) -> int:
        """Decoder layers the neighbours pass (joint CCA): the configured depth, or up to the highest CCA layer."""
        return self.config.neighbour_depth or self.config.cca_layers[-1] + 1

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def retro_parameters(self):
        """The parameters retro-fitting added (encoder and CCA blocks; the shared embedding table is not one)."""
        yield from self.encoder.parameters()
        yield from self.cca.parameters()

    def retro_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The added parameters by role, for per-group learning rates: "gate" (the CCA gates and null-slot scores,
        scalars), "cca_qk" (where content heads look: CCA query and key projections), "induction" (the token and
        previous-token projections of the induction path), "cca" (the rest of the CCA blocks) and "encoder" (the
        neighbour encoder)."""
        blocks = list(self.cca.values())
        if self.config.attention == "joint":  # gates and score biases; "cca_qk" the neighbour keys, "cca" values
            return {"gate": [p for block in blocks for p in (block.gate, block.bias)],
                    "cca_qk": [p for block in blocks for p in block.k_proj.parameters()], "induction": [],
                    "cca": [p for block in blocks for p in block.v_proj.parameters()], "encoder": []}
        gates = [p for block in blocks for p in (block.gate, block.sink)]
        qk = [p for block in blocks for mod in (block.q_proj, block.k_proj) for p in mod.parameters()]
        induction = [p for block in blocks
                     for mod in (block.q_token_proj, block.q_prev_proj, block.k_prev_proj, block.k_prev2_proj,
                                 block.token_norm)
                     for p in mod.parameters()]
        taken = {id(p) for p in gates + qk + induction}
        return {"gate": gates, "cca_qk": qk, "induction": induction,
                "cca": [p for p in self.cca.parameters() if id(p) not in taken], "encoder": list(self.encoder.parameters())}

    def retro_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()} | \
               {f"cca.{k}": v for k, v in self.cca.state_dict().items()}

    def set_gates(self, value: float) -> None:
        """Set every CCA gate's pre-tanh value (0 = base model exactly)."""
        with torch.no_grad():
            for block in self.cca.values():
                block.gate.fill_(value)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute activations in the backward pass instead of keeping them: the base's decoder layers (through
        HF's checkpointing, which wraps each layer's `forward` and so leaves this model's CCA hooks outside the
        recomputed region), every CCA block and the neighbour encoder (each its own region, run from the hooks).
        Gradients equal those of the model without it; only non-reentrant checkpointing is supported."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            raise ValueError("RetroModel supports non-reentrant gradient checkpointing only: pass "
                             "{'use_reentrant': False} (the default)")
        if "__init_subclass__" not in GradientCheckpointingLayer.__dict__:
            # older transformers wrap a layer's __call__, hooks included: the recomputed layers would lack their CCA
            raise ValueError("RetroModel's gradient checkpointing needs a transformers release whose checkpointed "
                             "layers keep module hooks outside the recomputed region; upgrade transformers")
        enable = getattr(self.base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._checkpointing = kwargs

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.base, "activation_checkpointing_disable", None) or \
            self.base.gradient_checkpointing_disable
        disable()
        self._checkpointing = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpointing is not None

    def _checkpointed(self, module: nn.Module, *args, **kwargs):
        """`module(*args, **kwargs)`, recomputed in the backward pass when gradient checkpointing is on and a
        backward pass will follow."""
        if self._checkpointing is None or not (self.training and torch.is_grad_enabled()):
            return module(*args, **kwargs)
        return checkpoint(module, *args, **self._checkpointing, **kwargs)

    def remove_hooks(self) -> None:
        """Detach from the base model, leaving it as it was before `retrofit`."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._joint_original is not None:
            for attn in attention_modules(decoder_layers(self.base)):
                if getattr(attn, "_retro_joint", None) is not None and attn._retro_joint.model is self:
                    del attn._retro_joint
            self.base.config._attn_implementation = self._joint_original
            self._joint_original = None

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, neighbours=None, labels=None, inputs_embeds=None,
                past_key_values=None, use_cache=False, position_ids=None, **kwargs) -> CausalLMOutputWithPast:
        """HF causal-LM forward plus `neighbours` (B, L, K, R), -1 padded, L >= the number of chunks in the sequence.

        With a KV cache the positions continue from the cache (`past_key_values.retro_state.offset`), and
        `neighbours` must hold the rows of every chunk so far (the same tensor grows during generation).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("RetroModel.forward: pass exactly one of input_ids or inputs_embeds")
        if self.training and self._checkpointing is None and getattr(self.base, "is_activation_checkpointing", False):
            raise ValueError("gradient checkpointing was switched on for RetroModel's base alone; call "
                             "RetroModel.gradient_checkpointing_enable() instead, which checks that the recomputed "
                             "layers keep their CCA and also checkpoints the CCA blocks and the neighbour encoder")
        B, n = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        cache = past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.base.config)
        state = self._state_for(cache)
        if state.with_neighbours is None:
            state.with_neighbours = neighbours is not None
        elif state.with_neighbours != (neighbours is not None):
            raise ValueError("RetroModel.forward: give neighbours in every step of a cached forward or in none "
                             "(None means the base model alone)")
        if neighbours is not None:
            neighbours = self._check_neighbours(neighbours, B, state.offset + n)
        step = None
        if neighbours is not None:
            tokens = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
            first = state.last_token if state.last_token is not None else torch.zeros_like(tokens[:, :1])
            step = _Step(state, neighbours, attention_mask, n, tokens, torch.cat([first, tokens[:, :-1]], dim=1),
                         cached=cache is not None)
            state.last_token = tokens[:, -1:]
            if self.config.attention == "joint":
                self._encode_joint(step, position_ids)
        self._step = step
        try:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=use_cache, labels=labels, inputs_embeds=inputs_embeds,
                            **kwargs)
        finally:
            self._step = None
        if cache is not None:
            state.offset += n
            cache.retro_state = state
        return out

    def _state_for(self, cache) -> _RetroState:
        if cache is None:
            return _RetroState()
        state = getattr(cache, "retro_state", None)
        seen = cache.get_seq_length()
        if state is None:
            if seen:
                raise ValueError("RetroModel.forward: this KV cache already holds tokens but no RETRO state; pass the "
                                 "cache returned by RetroModel.forward, not one filled by the bare base model")
            return _RetroState()
        if state.offset != seen:
            raise ValueError(f"RetroModel.forward: RETRO state is at position {state.offset} but the KV cache holds "
                             f"{seen} tokens; was the cache cropped or reused across batches?")
        return state

    def _check_neighbours(self, neighbours, B: int, total: int) -> torch.Tensor:
        neighbours = torch.as_tensor(neighbours, device=self.base.get_input_embeddings().weight.device).long()
        if neighbours.dim() != 4 or neighbours.shape[0] != B:
            raise ValueError(f"neighbours must be (B={B}, L, K, R) token ids, got shape {tuple(neighbours.shape)}")
        needed = total // self.chunk_size
        if neighbours.shape[1] < needed:
            raise ValueError(f"neighbours cover {neighbours.shape[1]} chunks but {total} tokens with chunk size "
                             f"{self.chunk_size} complete {needed}; pass (B, ceil(T/m), K, R) with -1 for missing")
        if neighbours.shape[3] > self.config.neighbour_length:
            raise ValueError(f"neighbour length R={neighbours.shape[3]} exceeds RetroConfig.neighbour_length="
                             f"{self.config.neighbour_length}")
        return neighbours

    def _make_hook(self, layer: int):
        first = layer == self.config.cca_layers[0]

        def hook(module, args, output):
            step = self._step
            if step is None:
                return output
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            if first:
                self._encode_finished_chunks(step, hidden)
            state = step.state
            if state.encoded is None:  # no chunk finished yet: nothing to attend anywhere
                return output
            # a recomputed block must not find the keys and values its first run cached: without a KV cache (all
            # that training uses) each call gets its own
            kv_cache = state.cca_kv.setdefault(layer, {}) if step.cached else None
            hidden = self._checkpointed(self.cca[str(layer)], hidden, state.encoded, state.encoded_valid,
                                        state.offset, self.chunk_size, kv_cache=kv_cache,
                                        neighbour_length=state.neighbour_length, tokens=step.tokens,
                                        previous=step.previous)
            return hidden if isinstance(output, torch.Tensor) else (hidden,) + tuple(output[1:])

        return hook

    def _encode_finished_chunks(self, step: _Step, hidden: torch.Tensor) -> None:
        """Encode the neighbours of every chunk finished by this step, conditioned on its first-CCA-layer states."""
        state, m = step.state, self.chunk_size
        done = 0 if state.encoded is None else state.encoded.shape[1]
        start = done * m  # absolute position where `pending` begins
        full = hidden if state.pending is None else torch.cat([state.pending, hidden], dim=1)  # (B, end-start, D)
        end = state.offset + step.n
        finished = end // m
        if finished > done:
            c = finished - done
            B, _, D = full.shape
            chunks = full[:, : c * m].reshape(B * c, m, D)  # (B*c, m, D)
            mask = step.attention_mask
            if mask is None:
                chunk_valid = torch.ones(B * c, m, dtype=torch.bool, device=full.device)
            else:
                if mask.shape[1] != end:
                    raise ValueError(f"attention_mask covers {mask.shape[1]} positions, expected {end} "
                                     f"(cached tokens + new tokens)")
                chunk_valid = mask[:, start:finished * m].bool().reshape(B * c, m)
            nb = step.neighbours[:, done:finished]  # (B, c, K, R)
            K, R = nb.shape[2:]
            enc = self._checkpointed(self.encoder, nb.reshape(B * c, K, R), self.get_input_embeddings(), chunks,
                                     chunk_valid)
            enc = enc.reshape(B, c, K * R, -1)  # (B, c, K*R, E)
            valid = (nb >= 0).reshape(B, c, K * R)
            if state.encoded is not None:
                enc = torch.cat([state.encoded, enc], dim=1)
                valid = torch.cat([state.encoded_valid, valid], dim=1)
            state.encoded, state.encoded_valid, state.neighbour_length = enc, valid, R
            full = full[:, c * m:]
        state.pending = full


    # -- joint CCA (RetroConfig.attention="joint") ------------------------------------------------------------

    def _encode_joint(self, step: _Step, position_ids: torch.Tensor | None) -> None:
        """Encode the neighbours of every chunk this step finishes with the frozen decoder itself, and project them
        into each CCA layer's neighbour keys and values (cached in the state as the chunks finish).

        A chunk's neighbours take the positions just before the position of the chunk's last token (where reading
        them starts), so at a fully open gate a layer reads them as if they stood right before its window."""
        state, m = step.state, self.chunk_size
        done, finished = state.joint_chunks, (state.offset + step.n) // m
        if finished <= done:
            return
        nb = step.neighbours[:, done:finished]  # (B, c, K, R)
        B, c, K, R = nb.shape
        dev = nb.device
        if position_ids is None:
            position_ids = torch.arange(state.offset, state.offset + step.n, device=dev)[None].expand(B, -1)
        last = torch.arange(done, finished, device=dev) * m + (m - 1) - state.offset  # (c,) index in this step
        anchor = position_ids.to(dev)[:, last]  # (B, c) position of each chunk's last token
        keys_at = anchor[:, :, None, None] - R + torch.arange(R, device=dev)  # (B, c, 1, R)
        keys_at = keys_at.expand(B, c, K, R).reshape(-1, R)
        valid = (nb >= 0).reshape(B, c, K * R)
        reads = bool(valid.any())
        if reads:
            projected = self._project_neighbours(nb, keys_at)
        else:  # nothing to read (the "none" control): keys and values every query masks out, no decoder pass
            dtype = self.get_input_embeddings().weight.dtype
            projected = {i: (torch.zeros(B, c, self.cca[str(i)].kv_heads, K * R, self.cca[str(i)].head_dim,
                                         device=dev, dtype=dtype),) * 2 for i in self.config.cca_layers}
        for i, (k, v) in projected.items():
            kv = state.cca_kv.setdefault(i, {})
            kv["k"] = k if not done else torch.cat([kv["k"], k], dim=1)
            kv["v"] = v if not done else torch.cat([kv["v"], v], dim=1)
        state.encoded_valid = valid if not done else torch.cat([state.encoded_valid, valid], dim=1)
        state.neighbour_length, state.joint_chunks = R, finished
        state.joint_reads = state.joint_reads or reads

    def _project_neighbours(self, nb: torch.Tensor, keys_at: torch.Tensor) -> dict[int, tuple[torch.Tensor, ...]]:
        """nb (B, c, K, R) neighbour ids, keys_at (B*c*K, R) their positions -> each CCA layer's neighbour keys and
        values (B, c, H/G, K*R, d), from the frozen decoder's states over the distinct rows."""
        B, c, K, R = nb.shape
        rows, inverse = torch.unique(nb.reshape(-1, R), dim=0, return_inverse=True)  # a question's chunks share them
        body = getattr(self.base, "base_model", self.base)
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in body.parameters())
        captured = sorted({min(i, self.neighbour_depth) for i in self.config.cca_layers})  # a layer above the
        # depth reads the states at the depth
        if self._neighbour_states is not None and not trainable:
            states = self._neighbour_states.lookup(rows, lambda missing: self._run_neighbours(body, missing, captured))
        else:
            with torch.set_grad_enabled(trainable):
                states = self._run_neighbours(body, rows, captured)
        depth, layers = self.neighbour_depth, decoder_layers(self.base)
        states = {i: states[min(i, depth)] for i in self.config.cca_layers}
        cos, sin = body.rotary_emb(states[self.config.cca_layers[0]], keys_at)  # (B*c*K, R, d)
        projected = {}
        for i in self.config.cca_layers:
            normed = layers[i].input_layernorm(states[i])[inverse]  # (B*c*K, R, D): this layer's input, normed
            k, v = self.cca[str(i)].project(normed, cos, sin)  # (B*c*K, H/G, R, d)
            projected[i] = tuple(t.view(B, c, K, *t.shape[1:]).permute(0, 1, 3, 2, 4, 5).reshape(B, c, t.shape[1],
                                                                                                K * R, -1)
                                 for t in (k, v))
        return projected

    def _run_neighbours(self, body: nn.Module, rows: torch.Tensor, captured: list[int]) -> dict[int, torch.Tensor]:
        """rows (U, R) neighbour ids, -1 padded -> each captured layer's input over them (U, R, D). The layers above
        the highest captured one never run."""
        layers = decoder_layers(self.base)
        states = {}  # hooks, not output_hidden_states, which leaves capturing hooks that pickle cannot store
        hooks = [layers[i].register_forward_pre_hook(_LayerInput(states, i), with_kwargs=True) for i in captured]
        hooks.append(layers[captured[-1]].register_forward_pre_hook(_stop_encoding))  # runs after the capture
        try:
            body(input_ids=rows.clamp(min=0), attention_mask=(rows >= 0).long(), use_cache=False)
        except _NeighboursEncoded:
            pass
        finally:
            for h in hooks:
                h.remove()
        return states

    @contextmanager
    def reusing_neighbours(self, max_bytes: int = 2 << 30):
        """Within the block, joint CCA runs each distinct neighbour through the decoder once and reuses its states
        (up to `max_bytes` of them; past that, new neighbours are encoded each time). For forwards in which the
        decoder's weights neither change nor receive gradients: an evaluation's passes (the shuffled control reads
        the true pass's neighbours), or a retro-fit, where only the added layers train. A forward where a decoder
        weight requires a gradient (LoRA on its layers) encodes afresh. Other designs ignore it."""
        if self.config.attention != "joint":
            yield
            return
        self._neighbour_states = _NeighbourStates(max_bytes)
        try:
            yield
        finally:
            self._neighbour_states = None

    def _joint_attend(self, layer: int, query, key, value, mask, scaling, base_out: torch.Tensor) -> torch.Tensor:
        """Called from inside layer `layer`'s attention: its output with the chunk neighbours read in."""
        step = self._step
        if step is None or not step.state.joint_reads:  # nothing to read: the layer's own output, exactly
            return base_out
        state, block = step.state, self.cca[str(layer)]
        kv = state.cca_kv[layer]
        return self._checkpointed(block, query, key, value, mask, scaling, base_out, kv["k"], kv["v"],
                                  state.encoded_valid, state.offset, self.chunk_size)

def reusing_neighbours(model: nn.Module, max_bytes: int = 2 << 30):
    """`RetroModel.reusing_neighbours` of the RETRO model inside `model` (a PEFT wrapper, say); a no-op context for
    any other model."""
    inner = next((m for m in model.modules() if isinstance(m, RetroModel)), None)
    return nullcontext() if inner is None else inner.reusing_neighbours(max_bytes)


def retrofit(base: nn.Module, config: RetroConfig | None = None) -> RetroModel:
    """Wrap `base` (frozen, weights untouched) with a neighbour encoder and zero-gated CCA blocks."""
    return RetroModel(base, config or RetroConfig())
