"""
Inference engine: batched sampling with a KV cache, and the calculator tool.

Everything is token ids in, token ids out. The engine uses only the model interface
(`make_kv_cache`, `forward(ids, kv_cache=...)` to prefill, `decode(ids, kv_cache)` for each new token,
`config.sequence_len`, `get_device`), so the
same code serves every model type.

Decoding is prefill + decode: the prompt is run once with batch size 1 (or several prompts of the same length
together, generate_many: evaluation and RL decode many problems at once), then the cache is expanded to
`num_samples` rows per prompt and each step feeds one token per row. Each row has a little state machine for
tool use: when the model writes <|python_start|> expr <|python_end|>, the engine evaluates expr with a safe
calculator and forces <|output_start|> result <|output_end|> into that row, as if the tool had answered.
"""

from collections import deque

import torch
import torch.nn.functional as F

from nanochat.tools import use_calculator

# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """
    Keys and values of every layer, preallocated: one (B, H_kv, T_max, D) key tensor and one value tensor per layer
    (separate tensors, not views of one: a compiled decode step then writes each in place, where a view of a
    shared buffer makes inductor copy the whole buffer every step). insert_kv() writes the new positions and
    returns views up to them; pos advances after the last layer, so all layers of one forward pass write at the
    same offset. With dtype/device None the tensors are allocated on the first insert, in the dtype and on the
    device of the keys (bf16 under CUDA autocast, fp32 on CPU).
    In a fixed-shape decode step (BaseLM.decode) step_pos holds the position as a (1,) tensor: the new token is
    written there with index_copy_, get_pos() returns that tensor, insert_kv() returns the whole tensors and
    attn_mask says which of their slots are filled, so the step's shapes never change (as gpt-fast's cache).
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device=None, dtype=None):
        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.layers = None  # [(k, v)] per layer, each (B, H_kv, T_max, D)
        if device is not None and dtype is not None:
            self._allocate(device, dtype)
        self.device, self.dtype = device, dtype
        self.pos = 0
        self.step_pos = None  # a (1,) long tensor during a fixed-shape decode step, else None
        self.slots = None  # arange(T_max) on the device, for attn_mask
        self._static = None  # the tensors last marked static for CUDA graphs

    def _allocate(self, device, dtype):
        L, _, B, H, T, D = self.shape
        self.layers = [tuple(torch.zeros(B, H, T, D, device=device, dtype=dtype) for _ in range(2)) for _ in range(L)]

    @property
    def batch_size(self):
        return self.shape[2]

    @property
    def seq_len(self):
        return self.shape[4]

    def reset(self):
        self.pos = 0

    def get_pos(self):
        return self.pos if self.step_pos is None else self.step_pos

    @property
    def attn_mask(self):
        """None, except in a fixed-shape decode step: (1, T_max) bool, True for the slots up to the new token."""
        return None if self.step_pos is None else self._mask

    def begin_step(self):
        """Enter a fixed-shape decode step at pos (BaseLM.decode). The position tensor is reused and updated in
        place, so a compiled step (or a CUDA graph) always reads it from the same memory."""
        if self.layers is None:
            raise RuntimeError("a fixed-shape decode step needs a filled KV cache: prefill the prompt first")
        if self.pos >= self.seq_len:
            raise RuntimeError(f"KV cache overflow: all seq_len={self.seq_len} positions are taken; create the "
                               f"cache with a larger seq_len (prompt length + max new tokens)")
        device = self.layers[0][0].device
        if self.slots is None or self.slots.device != device:
            self.slots = torch.arange(self.seq_len, device=device).unsqueeze(0)  # (Tq=1, T_max)
            self._pos = torch.zeros(1, dtype=torch.long, device=device)
            self._mask = torch.zeros(1, self.seq_len, dtype=torch.bool, device=device)
        if device.type == "cuda" and self._static is not self.layers:
            # a CUDA graph may then update these in place (gpt-fast keeps its cache as module buffers for this)
            for t in [t for kv in self.layers for t in kv] + [self._pos, self._mask]:
                torch._dynamo.mark_static_address(t)
            self._static = self.layers
        self._pos.fill_(self.pos)
        torch.le(self.slots, self.pos, out=self._mask)  # once per step, shared by all layers
        self.step_pos = self._pos

    def end_step(self):
        self.step_pos = None
        self.pos += 1

    def insert_kv(self, layer_idx, k, v):
        """k, v: (B, H_kv, T_new, D). Returns (k_all, v_all) of shape (B, H_kv, pos + T_new, D), or the whole
        tensors (B, H_kv, T_max, D) in a fixed-shape decode step."""
        if self.step_pos is not None:
            k_all, v_all = self.layers[layer_idx]
            k_all.index_copy_(2, self.step_pos, k.to(k_all.dtype))
            v_all.index_copy_(2, self.step_pos, v.to(v_all.dtype))
            return k_all, v_all
        B, H, T_new, D = k.shape
        _, _, B0, H0, T_max, D0 = self.shape
        if (B, H, D) != (B0, H0, D0):
            raise ValueError(f"KV cache holds (batch={B0}, kv_heads={H0}, head_dim={D0}) but got keys with "
                             f"(batch={B}, kv_heads={H}, head_dim={D}); build it with model.make_kv_cache()")
        t0, t1 = self.pos, self.pos + T_new
        if t1 > T_max:
            raise RuntimeError(f"KV cache overflow: {t0} cached + {T_new} new positions > seq_len={T_max}; "
                               f"create the cache with a larger seq_len (prompt length + max new tokens)")
        if self.layers is None:
            self._allocate(self.device or k.device, self.dtype or k.dtype)
        k_all, v_all = self.layers[layer_idx]
        k_all[:, :, t0:t1] = k
        v_all[:, :, t0:t1] = v
        if layer_idx == self.shape[0] - 1:
            self.pos = t1
        return k_all[:, :, :t1], v_all[:, :, :t1]

    def expand(self, batch_size):
        """After the prefill of B prompts, repeat each row batch_size // B times, in place (to sample several
        continuations of each prompt; rows stay grouped by prompt). Returns self."""
        B = self.shape[2]
        if batch_size == B:
            return self
        if batch_size % B:
            raise ValueError(f"KVCache.expand repeats each of the {B} prefilled rows the same number of times: "
                             f"batch_size={batch_size} is not a multiple of {B}")
        L, two, _, H, T_max, D = self.shape
        self.shape = (L, two, batch_size, H, T_max, D)
        if self.layers is not None:
            def grown(t):
                new = t.new_zeros(batch_size, H, T_max, D)
                new[:, :, :self.pos] = t[:, :, :self.pos].repeat_interleave(batch_size // B, dim=0)
                return new
            self.layers = [(grown(k), grown(v)) for k, v in self.layers]
        return self


# -----------------------------------------------------------------------------
# Sampling


# Below this temperature sampling is greedy: the distribution is one-hot on the most likely token to within float32
# anyway, and a temperature under ~1e-45 would round to 0 in float32 (a division by zero)
GREEDY_BELOW = 1e-6


def sample_next_token(logits, rng=None, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> next ids (B, 1). temperature 0 (or below GREEDY_BELOW) is greedy; top_k keeps the k most
    likely tokens; top_p keeps the smallest set whose probability reaches p (nucleus sampling, Holtzman et al.
    2019). Each row's largest logit is subtracted before dividing by the temperature, so no temperature overflows
    float32 into inf/NaN probabilities."""
    if not temperature >= 0:  # also NaN
        raise ValueError(f"temperature must be a number >= 0, got {temperature}")
    if temperature < GREEDY_BELOW:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        # drop a token when the tokens before it already reach top_p; the most likely one always stays, also when
        # top_p is so small (< 1e-45) that it rounds to 0 in float32 and `0 >= top_p` would drop it too
        drop_sorted = (cumulative - F.softmax(sorted_logits, dim=-1)) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


# -----------------------------------------------------------------------------
# One decode step, eager or compiled once (gpt-fast's decode_one_token)


def decode_step(model, ids, kv_cache):
    """One new token per row, ids (B, 1), after a prefill of kv_cache -> fp32 logits (B, V); advances the cache.
    Eager, a plain forward over the filled part of the cache (the fastest uncompiled). After compile_decode_step(),
    a fixed-shape step (KVCache.begin_step): every call has the same shapes, so it is compiled once."""
    compiled = getattr(model, "_compiled_step", None)
    if compiled is None:
        return model.forward(ids, kv_cache=kv_cache)[:, -1]
    frozen = getattr(model, "_frozen_versions", None)
    if frozen is not None and frozen != _param_versions(model):
        raise RuntimeError("the weights changed after compile_decode() froze them into the compiled CPU decode "
                           "step, which would keep decoding with the old ones; decode without compile_decode(), "
                           "or load the new weights in a fresh process and compile again")
    kv_cache.begin_step()
    try:
        logits = compiled(ids, kv_cache)
    finally:
        kv_cache.end_step()
    # a CUDA graph writes its next output into the same memory: hand out a copy
    return logits.clone() if logits.is_cuda else logits


def _param_versions(model):
    return [p._version for p in model.parameters()]  # every in-place change of a tensor bumps its version


def compile_decode_step(model, backend="inductor"):
    """torch.compile the model's one-token decode step (as gpt-fast): on CUDA with CUDA graphs (mode
    reduce-overhead), which removes the per-kernel launch cost that dominates small batches; on CPU with inductor's
    freezing, which folds the weights into the compiled step as constants (d4, batch 1: 1.1-1.4x the eager step;
    docs/benchmarks.md). Frozen weights cannot change afterwards: decode_step() refuses once they have. The first
    steps pay the compilation, and again when the cache is expanded to more rows. A model without
    fixed_shape_decode keeps the eager step. backend="eager" only captures the graph (tests). Returns the model."""
    if not model.fixed_shape_decode:
        return model
    device = model.get_device().type
    inductor = backend == "inductor"
    kwargs = {}
    if inductor and device == "cuda":
        kwargs["mode"] = "reduce-overhead"
    elif inductor and device == "cpu":
        kwargs["options"] = {"freezing": True}
        model._frozen_versions = _param_versions(model)

    def step(ids, kv_cache):
        return model.forward(ids, kv_cache=kv_cache)[:, -1]

    model._compiled_step = torch.compile(step, backend=backend, fullgraph=True, dynamic=False, **kwargs)
    return model


# -----------------------------------------------------------------------------
# Engine


def same_length_groups(prompts, max_group):
    """Indices of `prompts` in groups of at most max_group prompts of one length, for Engine.generate_many (which
    needs no padding then): shortest prompts first, each group in the prompts' order."""
    by_length = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    return [ids[j:j + max_group] for _, ids in sorted(by_length.items()) for j in range(0, len(ids), max_group)]


class RowState:
    """One sample's progress: its tokens, tokens waiting to be forced (tool output), and the tool-call state."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.forced = deque()
        self.in_python = False
        self.python_tokens = []
        self.completed = False


class Engine:

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer  # needed for tool use (decode the call, encode the result)

    def _special(self, name):
        return self.tokenizer.encode_special(name)

    def _advance_row(self, state, token):
        """Record `token` in a row; on <|python_end|>, queue the calculator's answer to be forced next."""
        state.tokens.append(token)
        if token in (self._special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()):
            state.completed = True
        if token == self._special("<|python_start|>"):
            state.in_python, state.python_tokens = True, []
        elif token == self._special("<|python_end|>") and state.in_python:
            state.in_python = False
            result = use_calculator(self.tokenizer.decode(state.python_tokens)) if state.python_tokens else None
            if result is not None:
                state.forced.append(self._special("<|output_start|>"))
                state.forced.extend(self.tokenizer.encode(str(result)))
                state.forced.append(self._special("<|output_end|>"))
            state.python_tokens = []
        elif state.in_python:
            state.python_tokens.append(token)

    def generate(self, tokens, num_samples=1, **kwargs):
        """Yield (token_column, token_masks) per step: one token per sample, mask 1 if sampled, 0 if forced by the
        tool. A row that ends (<|assistant_end|> or <|bos|>) keeps receiving tokens until all rows end; callers
        ignore what follows a row's end. Stops when every row ended, after max_tokens steps, or when the
        context is full. kwargs: max_tokens, temperature, top_k, top_p, seed."""
        yield from self.generate_many([tokens], num_samples, **kwargs)

    @torch.inference_mode()
    def generate_many(self, prompts, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None,
                      seed=42):
        """generate() for several prompts of the same length at once: one prefill of all of them, then
        num_samples rows per prompt, grouped by prompt (row p * num_samples + s). Batching changes the order of
        float sums inside the GEMMs, so a row's logits may differ from a lone run's in the last bits."""
        if not (isinstance(prompts, list) and prompts and all(isinstance(t, list) and t and
                                                               all(isinstance(i, int) for i in t) for t in prompts)):
            raise ValueError("tokens must be a non-empty list of ints (a prompt of token ids)")
        if len({len(t) for t in prompts}) > 1:
            raise ValueError(f"prompts decoded together must have the same length, got lengths "
                             f"{sorted({len(t) for t in prompts})}")
        tokens = prompts[0]
        context = self.model.config.sequence_len
        if len(tokens) > context:
            raise ValueError(f"prompt has {len(tokens)} tokens but the model's context is {context}; shorten it")
        device = self.model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        # 1) prefill the prompts once; the cache holds them plus what we will feed back
        capacity = context if max_tokens is None else min(context, len(tokens) + max_tokens)
        cache = self.model.make_kv_cache(len(prompts), capacity, device=device)
        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        # a model's vocab may be padded beyond the tokenizer's: never sample an id that cannot be decoded
        vocab_size = self.tokenizer.get_vocab_size()
        logits = self.model(ids, kv_cache=cache)[:, -1, :vocab_size]
        # 2) num_samples cache rows per prompt; every row samples its own first token
        cache.expand(len(prompts) * num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        rows = [RowState(t) for t in prompts for _ in range(num_samples)]

        num_generated = 0
        while True:
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)[:, 0].tolist()
            column, masks = [], []
            for state, token in zip(rows, sampled):
                forced = len(state.forced) > 0
                token = state.forced.popleft() if forced else token
                column.append(token)
                masks.append(0 if forced else 1)
                self._advance_row(state, token)
            yield column, masks
            num_generated += 1
            if all(state.completed for state in rows):
                break
            if max_tokens is not None and num_generated >= max_tokens:
                break
            if cache.pos >= capacity:  # the next token has no slot in the cache (or the rotary table)
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model.decode(ids, cache)[:, :vocab_size]

    def generate_batch(self, tokens, num_samples=1, keep_end=False, **kwargs):
        """Non-streaming: returns (results, masks), per sample the prompt plus the generated tokens and the matching
        masks (0 for prompt and forced tokens). The ending <|assistant_end|> / <|bos|> is left out, unless keep_end
        (RL learns to stop from it)."""
        return self.generate_batch_group([tokens], num_samples, keep_end, **kwargs)

    def generate_batch_group(self, prompts, num_samples=1, keep_end=False, **kwargs):
        """generate_batch() for several prompts of the same length, decoded together: results and masks of
        len(prompts) * num_samples rows, grouped by prompt."""
        ends = (self._special("<|assistant_end|>"), self.tokenizer.get_bos_token_id())
        results = [list(t) for t in prompts for _ in range(num_samples)]
        masks = [[0] * len(t) for t in results]
        done = [False] * len(results)
        for column, column_masks in self.generate_many(prompts, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in ends:
                    done[i] = True
                if token not in ends or keep_end:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks

    def generate_batch_many(self, prompts, num_samples=1, keep_end=False, max_prompts=8, seeds=None, **kwargs):
        """generate_batch() for prompts of any lengths (an evaluation's or an RL step's problems): those of one
        length are decoded together, at most max_prompts at a time (max_prompts * num_samples rows), each group
        sampling with the seed of its first prompt (seeds[i], default i). Yields (i, results, masks) for every
        prompt i, group by group as they finish, shortest prompts first."""
        seeds = range(len(prompts)) if seeds is None else seeds
        k = num_samples
        for group in same_length_groups(prompts, max_prompts):
            results, masks = self.generate_batch_group([prompts[i] for i in group], k, keep_end,
                                                       seed=seeds[group[0]], **kwargs)
            for g, i in enumerate(group):
                yield i, results[g * k:(g + 1) * k], masks[g * k:(g + 1) * k]
