"""Why top-k misses a needle in natural text, and which selection rule finds it (issue 33).

A 5-digit "secret number" sentence is hidden at several depths of held-out text (the
pinned CPython modules of benchmarks/corpus.py), every depth outside the window; the
question comes at the end in SmolLM2's chat template, and greedy decoding (up to
--max-new tokens) must write the number. Each variant of the selection rule is
measured on the same trials, and at the answer steps the script records, per layer
and KV head, whether the needle's blocks were selected, where Quest's bound and an
oracle (true attention mass per block) rank them, and the attention mass they get.

How it is made cheap (one model process, one thread). The prompt is split into a
prefix (the document) and a tail (the question, the chat template's end and the
assistant's first words). The prefix is run once per trial and per prefix mode
(full causal attention, or Λ), and its per-layer keys and values are kept. Each
variant then runs only the tail as one prefill chunk (selection by its last row,
the contract's rule "last") and the answer as decode steps, one row each, against
the kept prefix. This is the contract exactly for the rows that answer; what it
leaves out is that in an engine the prefix rows of the last prefill chunk would also
see the chunk's selection (here they see Λ). `--validate` checks that approximation
for the contract's rule: the exact reference (topk_reference.blockwise_topk_attention,
prefill chunks of 2048 rows) teacher-forced on the answer this script generated.

    OMP_NUM_THREADS=1 python benchmarks/topk_natural_needle.py --help
"""

import argparse
import dataclasses
import json
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import corpus_info, pinned_documents  # noqa: E402

from lminf_vllm.config import LminfConfig  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402
from lminf_vllm.rope import cos_sin, rotate  # noqa: E402
from lminf_vllm.testing.reference import DenseLlama  # noqa: E402
from lminf_vllm.testing.topk_reference import (  # noqa: E402
    block_bounds_matmul,
    blockwise_topk_attention,
    chunk_spans,
    keys_at_zero,
)

NEEDLE = "The secret number is {key}. Remember it.\n"
QUESTION = "What is the secret number mentioned in the text above?"
ANSWER_START = "The secret number is"  # the assistant's first words, after the chat template
TAIL_MARK = "\n\n" + QUESTION  # where the tail (the rows each variant recomputes) begins


# ---------------------------------------------------------------- the task


def build_trials(tok, docs, length: int, depths: list[float], seed: int) -> list[dict]:
    """Per document and depth: the chat prompt's token ids, the needle's token span, the key.

    The document is cut at a line end so that the prompt is about `length` tokens; the
    needle is a line of its own, inserted at the first line end after `depth` of the
    document's tokens.
    """
    rng = random.Random(seed)
    out = []
    for name, text in docs:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        for depth in depths:
            key = rng.randint(10000, 99999)
            needle = NEEDLE.format(key=key)
            overhead = len(_chat(tok, "", key=None)) + len(tok(needle, add_special_tokens=False)["input_ids"])
            budget = length - overhead
            cut = text.rfind("\n", 0, offsets[budget][0]) + 1  # the document's first `budget` tokens, whole lines
            at = text.find("\n", offsets[int(depth * budget)][0]) + 1
            body = text[:at] + needle + text[at:cut]
            ids, prompt = _chat(tok, body, key=key), _chat_text(tok, body)
            enc_p = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
            assert enc_p["input_ids"] == ids
            n0 = prompt.index(needle)
            span = [t for t, (a, b) in enumerate(enc_p["offset_mapping"]) if a < n0 + len(needle) and b > n0]
            tail_char = prompt.rindex(TAIL_MARK)
            tail = min(t for t, (a, b) in enumerate(enc_p["offset_mapping"]) if b > tail_char)
            out.append({"document": name, "depth": depth, "key": key, "ids": ids, "needle_tokens": [span[0], span[-1] + 1],
                        "tail_start": tail})  # fmt: skip
    return out


def _chat_text(tok, body: str) -> str:
    messages = [{"role": "user", "content": body + TAIL_MARK}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + ANSWER_START


def _chat(tok, body: str, key) -> list[int]:
    return tok(_chat_text(tok, body), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the variants


@dataclass(frozen=True)
class Variant:
    """One attention rule for the answering rows.

    attn: "full" (causal, true distances), "lambda" (SPEC.md, k = 0) or "topk".
    prefix: the prefix rows' attention, "full" or "lambda".
    scorer: how middle blocks are ranked: "quest" (the contract's bound, query at distance C),
        "exactmax" (the block's best token score at distance C: what the bound bounds, from every key),
        "mean" (the query at distance C against the block's mean key at position 0),
        "quest_d" (Quest's bound with the query at the block's own distance, min(i - its middle, C)),
        "quest_then_oracle" (Quest's bound keeps 4k blocks, the oracle's mass picks k of them),
        "oracle" (the row's true attention mass per block with every middle block visible,
        at the variant's distance rule) or "all" (every middle block visible: k = infinity).
    reduce: "max" (one selection per KV head, the group's max: the contract) or "head"
        (one selection per query head).
    dist: distance a selected middle token is shown at: "cap" (min(i - j, C): the contract),
        "C" (always C), "true" (i - j) or "compress" (i - j mapped linearly, order kept, from
        [W, i - g*B] into [W, C]).
    dense_layers: the first layers see every middle block (scorer "all" there).
    query: "current" (the contract: each decode row scores with its own query) or "tail"
        (the max of the bounds of the current row and of every row of the last prefill chunk) or "sticky"
        (the prompt's last row selects; the decode rows keep its selection).
    """

    name: str
    attn: str = "topk"
    prefix: str = "lambda"
    k: int = 4
    B: int = 64
    scorer: str = "quest"
    reduce: str = "max"
    dist: str = "cap"
    dense_layers: int = 0
    query: str = "current"


def variants_table() -> dict[str, Variant]:
    V = Variant
    rows = [
        V("full attention", attn="full", prefix="full", k=0),
        V("lambda (k=0)", attn="lambda", k=0),
        V("topk quest 4x64 (contract)"),
        V("topk quest 4x128", B=128),
        V("all middle visible, cap (k=inf)", scorer="all"),
        V("all middle visible, true distance", scorer="all", dist="true"),
        V("topk oracle 4x64", scorer="oracle"),
        V("topk oracle 4x64 per head", scorer="oracle", reduce="head"),
        V("topk quest 4x64 per head", reduce="head"),
        V("topk quest 12x64 (group max)", k=12),
        V("topk quest 4x64 dense L0-1", dense_layers=2),
        V("topk quest 4x64 dense L0", dense_layers=1),
        V("topk quest 4x64 dist C", dist="C"),
        V("topk quest 4x64 dist true", dist="true"),
        V("topk quest 4x64 dist compress", dist="compress"),
        V("topk oracle 4x64 dist true", scorer="oracle", dist="true"),
        V("topk quest 16x16", k=16, B=16),
        V("topk quest 8x32", k=8, B=32),
        V("topk quest 16x64", k=16),
        V("topk oracle 16x16", scorer="oracle", k=16, B=16),
        V("topk quest 8x64", k=8),
        V("topk quest 16x16 per head", k=16, B=16, reduce="head"),
        V("topk quest 4x64 per head dense L0-1", reduce="head", dense_layers=2),
        V("topk quest 4x64 query tail", query="tail"),
        V("topk exact-max 4x64", scorer="exactmax"),
        V("topk mean-key 4x64", scorer="mean"),
        V("topk mean-key 4x64 per head", scorer="mean", reduce="head"),
        V("topk mean-key 16x16", scorer="mean", k=16, B=16),
        V("topk quest at block distance 4x64", scorer="quest_d"),
        V("topk oracle 4x64 sticky", scorer="oracle", query="sticky"),
        V("topk oracle 4x64 per head sticky", scorer="oracle", reduce="head", query="sticky"),
        V("topk oracle 12x64 (group max)", scorer="oracle", k=12),
        V("topk oracle 4x128", scorer="oracle", B=128),
        V("topk oracle 4x128 per head", scorer="oracle", B=128, reduce="head"),
        V("topk exact-max 4x64 per head", scorer="exactmax", reduce="head"),
        V("topk quest top-16 then oracle 4x64", scorer="quest_then_oracle"),
        V("topk quest top-16 then oracle 4x64 per head", scorer="quest_then_oracle", reduce="head"),
        V("topk quest 4x128 query tail", B=128, query="tail"),
    ]
    return {v.name: v for v in rows}


# ---------------------------------------------------------------- the model, prefix once, tail per variant


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Study:
    def __init__(self, model: DenseLlama, cfg: LminfConfig, max_pos: int, model_dir=None):
        self.m, self.cfg, self.model_dir, self._hf = model, cfg, model_dir, None
        self.rotary = model.rotary
        pos = torch.arange(max_pos)
        self.cos, self.sin = (t * self.rotary.attention_scaling for t in cos_sin(pos, self.rotary.inv_freq, model.dtype))
        self.H, self.Hkv, self.D = model.n_heads, model.n_kv, model.head_dim
        self.scale = self.D**-0.5

    def hf(self):
        if self._hf is None:
            from transformers import AutoModelForCausalLM

            self._hf = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.m.dtype).eval()
        return self._hf

    def _rot(self, x, positions):  # x [n, h, D] rotated at positions [n]
        return rotate(x, self.cos[positions][:, None], self.sin[positions][:, None], self.rotary)

    def _qkv(self, layer, x):
        m, n = self.m, x.shape[0]
        p = f"model.layers.{layer}."
        h = m._norm(x, m.w[p + "input_layernorm.weight"])
        q = m._linear(h, p + "self_attn.q_proj").view(n, self.H, self.D)
        k = m._linear(h, p + "self_attn.k_proj").view(n, self.Hkv, self.D)
        v = m._linear(h, p + "self_attn.v_proj").view(n, self.Hkv, self.D)
        return q, k, v

    def _rest(self, layer, x, attn):
        m, p = self.m, f"model.layers.{layer}."
        x = x + m._linear(attn.reshape(x.shape[0], -1), p + "self_attn.o_proj")
        h = m._norm(x, m.w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(m._linear(h, p + "mlp.gate_proj"))
        return x + m._linear(gate * m._linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")

    @torch.no_grad()
    def prefix(self, ids: list[int], mode: str) -> list[dict]:
        """Per layer: keys at their positions (k_rot), at position 0 (kz), values, for the prefix rows."""
        n = len(ids)
        pos = torch.arange(n)
        if mode == "full":
            # stock transformers (sdpa) runs the prefix; its cache holds keys rotated at their positions
            out = self.hf()(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            cache = []
            for layer in out.past_key_values.layers:
                k_rot, v = layer.keys[0].transpose(0, 1).to(self.m.dtype), layer.values[0].transpose(0, 1).to(self.m.dtype)
                # back to position 0: R(-j), a pure rotation (the table's scaling stays on the key, as keys_at_zero)
                c, s_ = cos_sin(pos, self.rotary.inv_freq, self.m.dtype)
                cache.append({"k_rot": k_rot, "kz": rotate(k_rot, c[:, None], -s_[:, None], self.rotary), "v": v})
            return cache
        x = self.m.w["model.embed_tokens.weight"][torch.as_tensor(ids)]
        cache = []
        for layer in range(self.m.n_layers):
            q, k, v = self._qkv(layer, x)
            attn = blockwise_topk_attention(q, k, v, self.cfg, self.rotary, self.scale, topk=0, block_size=64)
            cache.append({"k_rot": self._rot(k, pos), "kz": keys_at_zero(k, self.rotary), "v": v})
            x = self._rest(layer, x, attn)
        return cache

    @torch.no_grad()
    def generate(self, cache, ids: list[int], tail_start: int, var: Variant, needle_blocks, max_new: int, eos: int):
        """Greedy: the tail ids[tail_start:] as one chunk, then decode rows; returns new ids and per-step diagnostics."""
        n_prompt = len(ids)
        kv = [{key: t.clone() for key, t in c.items()} for c in cache]
        for c in kv:
            for key in c:
                c[key] = c[key][:tail_start]
        state = {"tail_scores": {}, "summaries": {}}
        rows, out, diag = list(range(tail_start, n_prompt)), [], []
        chunk_ids = ids[tail_start:]
        for step in range(max_new):
            x = self.m.w["model.embed_tokens.weight"][torch.as_tensor(chunk_ids)]
            pos = torch.tensor(rows)
            step_diag = []
            for layer in range(self.m.n_layers):
                q, k, v = self._qkv(layer, x)
                c = kv[layer]
                c["k_rot"] = torch.cat((c["k_rot"], self._rot(k, pos)))
                c["kz"] = torch.cat((c["kz"], keys_at_zero(k, self.rotary)))
                c["v"] = torch.cat((c["v"], v))
                attn, d = self._attend(layer, q, c, rows, var, state, needle_blocks, first_step=step == 0)
                step_diag.append(d)
                x = self._rest(layer, x, attn)
            x = self.m._norm(x[-1:], self.m.w["model.norm.weight"])
            head = self.m.w.get("lm_head.weight", self.m.w["model.embed_tokens.weight"])
            nxt = int((x @ head.T).argmax(-1))
            out.append(nxt)
            diag.append(step_diag)
            if nxt == eos:
                break
            chunk_ids, rows = [nxt], [rows[-1] + 1]
        return out, diag

    def _summaries(self, layer, c, B, state):
        key = (layer, B)
        if key not in state["summaries"]:
            kz = c["kz"]
            nb = kz.shape[0] // B
            blocks = kz[: nb * B].reshape(nb, B, self.Hkv, self.D)
            state["summaries"][key] = (blocks.amin(1), blocks.amax(1))
        return state["summaries"][key]

    def _scores(self, q, c, rows, var, middle_tok, rel):
        """[R, H, e] scores of every key at the variant's distances (masking comes after)."""
        R, e = q.shape[0], rel.shape[1]
        W, C = self.cfg.local_tokens, self.cfg.distance_cap
        g = self.H // self.Hkv
        pos = torch.tensor(rows)
        q_rot = self._rot(q, pos).view(R, self.Hkv, g, self.D)
        q_cap = rotate(q, self.cos[C], self.sin[C], self.rotary).view(R, self.Hkv, g, self.D)
        s_true = torch.einsum("rkgd,ekd->rkge", q_rot, c["k_rot"]).reshape(R, self.H, e)
        s_cap = torch.einsum("rkgd,ekd->rkge", q_cap, c["kz"]).reshape(R, self.H, e)
        capped = rel > C  # SPEC.md: min(i - j, C) outside the window
        s = torch.where(capped[:, None], s_cap, s_true)
        if var.attn == "full":
            return s_true * self.scale
        if var.dist == "C":
            s = torch.where(middle_tok[:, None], s_cap, s)
        elif var.dist == "true":
            s = torch.where(middle_tok[:, None], s_true, s)
        elif var.dist == "compress":
            gB = _cdiv(self.cfg.global_tokens, var.B) * var.B
            for r, i in enumerate(rows):
                cols = middle_tok[r].nonzero().flatten()
                if not len(cols):
                    continue
                factor = min(1.0, (C - W) / max(1, i - gB - W))
                d = (W + ((i - cols - W).double() * factor).round().long()).clamp(max=C)
                qd = rotate(q[r][None], self.cos[d][:, None], self.sin[d][:, None], self.rotary).view(len(cols), self.Hkv, g, self.D)
                s[r, :, cols] = (qd * c["kz"][cols][:, :, None]).sum(-1).reshape(len(cols), self.H).T
        return s * self.scale

    def _attend(self, layer, q, c, rows, var, state, needle_blocks, first_step):
        cfg, B = self.cfg, var.B
        G, W, C = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
        R, e = q.shape[0], c["kz"].shape[0]
        g = self.H // self.Hkv
        i = torch.tensor(rows)[:, None]
        j = torch.arange(e)[None, :]
        rel = i - j
        causal = rel >= 0
        gblk = _cdiv(G, B)
        fwb = (i - W + 1).clamp(min=0) // B  # [R, 1] first window block per row
        blk = j // B
        middle_tok = (blk >= gblk) & (blk < fwb) & causal  # [R, e]
        last = rows[-1]
        f_last = max(0, last - W + 1) // B
        cand = list(range(gblk, max(gblk, f_last)))
        s = self._scores(q, c, rows, var, middle_tok, rel)  # [R, H, e], scaled
        # the needle's blocks among the candidates, for the diagnostics
        nb_idx = [b - gblk for b in needle_blocks.get(B, []) if gblk <= b < f_last]
        if var.attn == "full":
            visible = causal[:, None].expand(R, self.H, e)
        elif var.attn == "lambda":
            visible = (((j < G) | (rel < W)) & causal)[:, None].expand(R, self.H, e)
        else:
            base = ((blk < gblk) | (blk >= fwb)) & causal  # whole global and window blocks
            sel = torch.zeros(self.H, max(1, f_last), dtype=torch.bool)  # [H, blocks] selected per query head
            scorer = "all" if layer < var.dense_layers else var.scorer
            if cand and scorer == "all":
                sel[:, gblk:f_last] = True
            elif cand and var.query == "sticky" and not first_step:
                kept = state["sticky"][layer]  # the selection made at the prompt's last row
                sel[:, : kept.shape[1]] = kept[:, : sel.shape[1]]
            elif cand:
                score = self._block_scores(layer, q, c, rows, var, scorer, s, base, cand, state, first_step)  # [H, cand]
                if var.reduce == "max":
                    grp = score.view(self.Hkv, g, -1).amax(1)
                    top = torch.sort(grp, dim=-1, descending=True, stable=True).indices[:, : var.k]
                    for h in range(self.Hkv):
                        sel[h * g : (h + 1) * g, [cand[t] for t in top[h].tolist()]] = True
                else:
                    top = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, : var.k]
                    for h in range(self.H):
                        sel[h, [cand[t] for t in top[h].tolist()]] = True
            if var.query == "sticky" and first_step:
                state.setdefault("sticky", {})[layer] = sel.clone()
            picked = torch.zeros(R, self.H, e, dtype=torch.bool)
            nsel = sel.shape[1] * B
            picked[:, :, :nsel] = sel.repeat_interleave(B, 1)[None, :, :nsel]
            visible = base[:, None] | (picked & causal[:, None])
        scores = s.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, -1)
        out = torch.einsum("rkge,ekd->rkgd", probs.view(R, self.Hkv, g, e), c["v"]).reshape(R, self.H, -1)
        # diagnostics of the answering row (the chunk's last row)
        d = {}
        if nb_idx:
            d["needle_mass"] = self._block_mass(probs[-1], B, [gblk + t for t in nb_idx])  # [H] mass this run gives the needle
            if var.attn == "topk":
                d["selected"] = [bool(sel[h, [gblk + t for t in nb_idx]].any()) for h in range(self.H)]
            # ranks of the best needle block among the candidates, the group's max per KV head
            bound = self._quest(layer, q[-1:], c, B, state)[:, gblk:f_last]  # [H, cand]
            full_vis = (((blk < f_last) | (blk >= fwb)) & causal)[-1]  # every middle block visible
            mass = self._block_mass(torch.softmax(s[-1].masked_fill(~full_vis, float("-inf")), -1), B, cand, per_block=True)
            d["quest_rank"] = _ranks(bound.view(self.Hkv, g, -1).amax(1), nb_idx)
            d["oracle_rank"] = _ranks(mass.view(self.Hkv, g, -1).amax(1), nb_idx)
            d["oracle_mass"] = [round(float(x), 4) for x in mass[:, nb_idx].sum(-1)]  # [H]: all middle visible
            d["n_cand"] = len(cand)
        return out, d

    def _quest(self, layer, q, c, B, state):
        kmin, kmax = self._summaries(layer, c, B, state)
        q_cap = rotate(q, self.cos[self.cfg.distance_cap], self.sin[self.cfg.distance_cap], self.rotary)
        return block_bounds_matmul(q_cap, kmin, kmax).amax(0)  # [H, nb]; rows reduced by max

    @staticmethod
    def _block_mass(p, B, blocks, per_block=False):
        """p [H, e]: per block mass [H, len(blocks)] (per_block) or the summed mass of `blocks` [H]."""
        m = torch.stack([p[:, b * B : (b + 1) * B].sum(-1) for b in blocks], -1)
        return m if per_block else [round(float(x), 4) for x in m.sum(-1)]

    def _block_scores(self, layer, q, c, rows, var, scorer, s, base, cand, state, first_step):
        B = var.B
        lo, hi = cand[0], cand[-1] + 1
        if scorer == "quest":
            if var.query == "tail" and first_step:
                # the max of the bounds over the tail rows, each over the blocks that are middle for it
                W = self.cfg.local_tokens
                per_row = []
                for r, i in enumerate(rows):
                    b = self._quest(layer, q[r : r + 1], c, B, state)[:, lo:hi]
                    f_i = max(0, i - W + 1) // B
                    b[:, torch.arange(lo, hi) >= f_i] = float("-inf")
                    per_row.append(b)
                score = torch.stack(per_row).amax(0)
                state["tail_scores"][layer] = score
                return score
            score = self._quest(layer, q[-1:], c, B, state)[:, lo:hi]
            if var.query == "tail":
                prev = state["tail_scores"][layer]
                pad = score.new_full((score.shape[0], score.shape[1] - prev.shape[1]), float("-inf"))
                score = torch.maximum(score, torch.cat((prev, pad), 1))
            return score
        if scorer == "quest_d":
            # Quest's bound with the query rotated to each block's own distance, min(i - middle of the block, C)
            kmin, kmax = self._summaries(layer, c, B, state)
            i = rows[-1]
            d = torch.tensor([min(i - (b * B + B // 2), self.cfg.distance_cap) for b in cand])
            qd = rotate(q[-1][None], self.cos[d][:, None], self.sin[d][:, None], self.rotary)  # [cand, H, D]
            g = self.H // self.Hkv
            lo_, hi_ = (t[lo:hi].repeat_interleave(g, 1) for t in (kmin, kmax))  # [cand, H, D]
            return torch.maximum(qd * lo_, qd * hi_).sum(-1).T  # [H, cand]
        if scorer in ("exactmax", "mean"):
            # scored at distance C as Quest is, but from the keys themselves: the block's best
            # token (what Quest's bound bounds) or its mean key (one vector per block)
            C = self.cfg.distance_cap
            q_cap = rotate(q[-1], self.cos[C], self.sin[C], self.rotary).view(self.Hkv, -1, self.D)  # [Hkv, g, D]
            kz = c["kz"][lo * B : hi * B].reshape(hi - lo, B, self.Hkv, self.D)
            if scorer == "mean":
                return torch.einsum("kgd,bkd->kgb", q_cap, kz.mean(1)).reshape(self.H, -1)
            return torch.einsum("kgd,btkd->kgbt", q_cap, kz).amax(-1).reshape(self.H, -1)
        # oracle: the last row's mass per candidate block with every middle block visible
        blk = torch.arange(s.shape[-1]) // B
        vis = (base[-1] | ((blk >= lo) & (blk < hi)))[None]
        p = torch.softmax(s[-1].masked_fill(~vis, float("-inf")), -1)
        mass = self._block_mass(p, B, cand, per_block=True)
        if scorer == "quest_then_oracle":
            # Quest's bound keeps 4k candidates (per KV head: the group's max; per head: its own), the mass picks k
            bound = self._quest(layer, q[-1:], c, B, state)[:, lo:hi]
            g = self.H // self.Hkv
            if var.reduce == "max":
                bound = bound.view(self.Hkv, g, -1).amax(1).repeat_interleave(g, 0)
            keep = torch.sort(bound, dim=-1, descending=True, stable=True).indices[:, : 4 * var.k]
            masked = torch.full_like(mass, -1.0)
            masked.scatter_(1, keep, mass.gather(1, keep))
            return masked
        return mass


def _ranks(score, idx):
    """Per KV head: 0-based rank (stable, lower index first on ties) of the best of idx among the candidates."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    out = []
    for h in range(score.shape[0]):
        pos = {int(t): r for r, t in enumerate(order[h])}
        out.append(min(pos[t] for t in idx))
    return out


# ---------------------------------------------------------------- one trial, every variant


def summarize(diag, var: Variant, k: int) -> dict:
    """Per answer step and layer diagnostics -> a compact record (steps: the rows that produced tokens)."""
    first = diag[0]
    layers = len(first)
    rec = {}
    if var.attn == "topk":
        shares = []
        for layer in range(layers):
            vals = [any(st[layer].get("selected", [False])[h * 3 : h * 3 + 3]) for st in diag for h in range(3) if "selected" in st[layer]]
            shares.append(round(sum(vals) / len(vals), 3) if vals else None)
        flat = [x for x in shares if x is not None]
        rec["needle_selected_share"] = round(sum(flat) / len(flat), 3) if flat else None
        rec["needle_selected_share_per_layer"] = shares
    if "quest_rank" in first[0]:
        rec["first_step"] = {
            "n_cand": first[0]["n_cand"],
            "quest_rank": [st["quest_rank"] for st in first],  # [layer][KV head]
            "oracle_rank": [st["oracle_rank"] for st in first],
            "needle_mass": [st["needle_mass"] for st in first],  # [layer][query head], this run's attention
            "oracle_mass": [st["oracle_mass"] for st in first],  # [layer][query head], every middle block visible
        }
        steps = [st for st in diag]
        rec["quest_in_topk_share"] = round(sum(r < k for st in steps for L in st for r in L["quest_rank"]) / sum(len(L["quest_rank"]) for st in steps for L in st), 3)
        rec["oracle_in_topk_share"] = round(sum(r < k for st in steps for L in st for r in L["oracle_rank"]) / sum(len(L["oracle_rank"]) for st in steps for L in st), 3)
    return rec


def validate(model, tok, trial, cfg, answer_ids, B, k):
    """The exact contract's own greedy answer (prefill chunks of 2048, one chunk per answer token).

    Teacher forcing on a guess (first: this script's answer) gives the exact argmax at every answer
    position; where it first differs, the guess is corrected and the forcing run again, until the
    guess is a fixed point: then greedy decoding with the exact contract writes it. Returns
    (answer ids, forward passes).
    """
    import functools

    prompt, guess = trial["ids"], list(answer_ids)
    for passes in range(1, len(guess) + 1):
        ids = prompt + guess[:-1]
        chunks = [e - s for s, e in chunk_spans(len(prompt), 2048)] + [1] * (len(guess) - 1)
        attn = functools.partial(blockwise_topk_attention, topk=k, block_size=B, chunks=chunks, score="bound")
        pred = model.logits(ids, cfg, attention=attn)[len(prompt) - 1 :].argmax(-1).tolist()
        if pred == guess:
            break
        first = next(t for t, (a, b) in enumerate(zip(pred, guess)) if a != b)
        guess = guess[:first] + [pred[first]] + pred[first + 1 :]  # the rest: the forced run's own guesses
    return guess, passes


def report(path: Path, threshold: float = 0.1, k: int = 4) -> None:
    """The tables of docs/topk-contract.md's "Natural text" section, from the results file."""
    import statistics

    doc = json.loads(path.read_text())
    by_dtype: dict[str, dict[str, dict]] = {}
    for run in doc["runs"]:
        merged = by_dtype.setdefault(run["setting"]["dtype"], {})
        for name, r in run["results"].items():
            merged.setdefault(name, {})
            for t in r["trials"]:
                merged[name][(t["document"], t["depth"])] = t
    for dtype, merged in by_dtype.items():
        print(f"\n{dtype}\n| variant | found / trials | needle selected (answer steps x layers x KV heads) |\n|---|---|---|")
        for name, trials in merged.items():
            sel = [t["needle_selected_share"] for t in trials.values() if t.get("needle_selected_share") is not None]
            print(f"| {name} | {sum(t['hit'] for t in trials.values())} / {len(trials)} | "
                  + (f"{statistics.mean(sel):.0%}" if sel else "") + " |")  # fmt: skip
    merged = by_dtype["float32"]
    full, contract = merged.get("full attention", {}), merged.get("topk quest 4x64 (contract)", {})
    oracle = merged.get("topk oracle 4x64", {})
    heads, rows = [], []
    for key, f in full.items():
        c = contract.get(key)
        if c is None or "first_step" not in f or "first_step" not in c:
            continue
        fm = f["first_step"]["needle_mass"]
        for layer, per_head in enumerate(fm):
            for h, m in enumerate(per_head):
                if m >= threshold:
                    kv = h // 3
                    heads.append({"trial": key, "layer": layer, "head": h, "full_mass": m,
                                  "cap_mass": c["first_step"]["oracle_mass"][layer][h],
                                  "quest_rank": c["first_step"]["quest_rank"][layer][kv],
                                  "oracle_rank": c["first_step"]["oracle_rank"][layer][kv],
                                  "full_quest_rank": f["first_step"]["quest_rank"][layer][kv],
                                  "oracle_run_mass": oracle[key]["first_step"]["oracle_mass"][layer][h] if key in oracle else None})  # fmt: skip
        rows.append((key, f["hit"], c["hit"], c["quest_in_topk_share"], c["oracle_in_topk_share"], c["first_step"]["n_cand"]))
    print(f"\nretrieval heads (full attention gives the needle's blocks >= {threshold:.0%} of a head's mass at the first"
          f" answer step): {len(heads)} (layer, head) over {len(rows)} trials")  # fmt: skip
    if heads:
        layers = sorted({h["layer"] for h in heads})
        print(f"  layers: {layers}")
        for what in ("quest_rank", "oracle_rank", "full_quest_rank"):
            ranks = [h[what] for h in heads]
            print(f"  {what}: in the top {k} {sum(r < k for r in ranks)}/{len(ranks)}, median {statistics.median(ranks)}")
        print(f"  needle mass, full attention: median {statistics.median(h['full_mass'] for h in heads):.3f}; "
              f"every middle block visible at min(i-j, C), contract run's queries: median "
              f"{statistics.median(h['cap_mass'] for h in heads):.3f}; the same with the oracle run's queries: median "
              f"{statistics.median(h['oracle_run_mass'] for h in heads if h['oracle_run_mass'] is not None):.3f}")  # fmt: skip
    for key, t in contract.items():
        if "exact_contract_answer" in t:
            print(f"  exact contract (prefill chunks of 2048) on {key}: {t['exact_contract_answer']!r} "
                  f"({'hit' if str(t['key']) in t['exact_contract_answer'] else 'miss'}); this script: {t['answer']!r}")  # fmt: skip
    for key, fh, ch, qs, os_, nc in rows:
        print(f"  {key}: full {'hit' if fh else 'miss'}, contract {'hit' if ch else 'miss'}; needle in the top {k} by "
              f"Quest {qs:.0%}, by the oracle {os_:.0%} of (step, layer, KV head); {nc} candidates")  # fmt: skip


DIAGNOSED = {"full attention", "topk quest 4x64 (contract)", "topk oracle 4x64", "topk oracle 4x64 per head"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (about)")
    p.add_argument("--documents", type=int, default=4, help="pinned documents used (longest first in the manifest)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.4, 0.7], help="needle depth, share of the document part")
    p.add_argument("--variants", nargs="+", default=None, help="variant names (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--local-tokens", type=int, default=1024)
    p.add_argument("--distance-cap", type=int, default=2048)
    p.add_argument("--max-new", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--validate", action="store_true", help="also run the exact contract for 'topk quest 4x64 (contract)'")
    p.add_argument("--hf-stock", action="store_true", help="also greedy-decode with stock transformers (full attention)")
    p.add_argument("--check-all", action="store_true",
                   help="--validate / --hf-stock on every trial (default: one depth per document, rotating)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials-limit", type=int, default=0, help="run only the first N trials (0: all)")
    p.add_argument("--trial-index", type=int, nargs="+", help="run only these trials (0-based, documents x depths)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/topk-natural-needle.json"))
    p.add_argument("--report", action="store_true", help="print the tables from --out and exit")
    args = p.parse_args(argv)
    if args.report:
        return report(args.out)
    table = variants_table()
    if args.list:
        for v in table.values():
            print(v)
        return
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from lminf_vllm.prepare_model import DEFAULT_OUT

    model_dir = DEFAULT_OUT
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = DenseLlama(model_dir, dtype=dtype)
    cfg = LminfConfig(args.global_tokens, args.local_tokens, args.distance_cap)
    docs = pinned_documents()[: args.documents]
    trials = build_trials(tok, docs, args.length, args.depths, args.seed)
    if args.trials_limit:
        trials = trials[: args.trials_limit]
    if args.trial_index:
        trials = [trials[i] for i in args.trial_index]
    chosen = [table[n] for n in (args.variants or table)]
    study = Study(model, cfg, args.length + 64, model_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = doc.get("runs", [])
    setting = {"length": args.length, "global_tokens": cfg.global_tokens, "local_tokens": cfg.local_tokens,
               "distance_cap": cfg.distance_cap, "dtype": args.dtype, "max_new": args.max_new, "seed": args.seed,
               "depths": args.depths, "documents": [d[0] for d in docs]}  # fmt: skip
    results = {v.name: {"config": dataclasses.asdict(v), "trials": []} for v in chosen}
    t_start = time.time()
    for t, trial in enumerate(trials):
        n = len(trial["ids"])
        checked = args.check_all or t % len(args.depths) == (t // len(args.depths)) % len(args.depths)
        a, b = trial["needle_tokens"]
        needle_blocks = {B: sorted({x // B for x in range(a, b)}) for B in (16, 32, 64, 128)}
        info = {"document": trial["document"], "depth": trial["depth"], "key": trial["key"], "prompt_tokens": n,
                "needle_tokens": [a, b], "needle_from_end": n - a, "tail_tokens": n - trial["tail_start"]}  # fmt: skip
        for mode in ("lambda", "full"):
            group = [v for v in chosen if v.prefix == mode]
            if not group:
                continue
            t0 = time.time()
            cache = study.prefix(trial["ids"][: trial["tail_start"]], mode)
            print(f"[{t + 1}/{len(trials)}] {trial['document']} depth {trial['depth']} key {trial['key']} ({n} tokens, "
                  f"needle {n - a} from the end): {mode} prefix {time.time() - t0:.0f} s", flush=True)  # fmt: skip
            for v in group:
                t0 = time.time()
                new, diag = study.generate(cache, trial["ids"], trial["tail_start"], v, needle_blocks, args.max_new, eos)
                text = tok.decode(new)
                row = {**info, "answer": text, "hit": str(trial["key"]) in text, "seconds": round(time.time() - t0, 1),
                       **summarize(diag, v, v.k if v.attn == "topk" else 4)}  # fmt: skip
                if args.validate and checked and v.name == "topk quest 4x64 (contract)":
                    t1 = time.time()
                    exact, passes = validate(model, tok, trial, cfg, new, v.B, v.k)
                    row["exact_contract_agrees"] = exact == new
                    row["exact_contract_answer"] = tok.decode(exact)
                    row["exact_contract_hit"] = str(trial["key"]) in row["exact_contract_answer"]
                    row["exact_passes"] = passes
                    row["exact_seconds"] = round(time.time() - t1)
                results[v.name]["trials"].append(row)
                sel = row.get("needle_selected_share")
                print(f"    {v.name}: {text!r} {'HIT' if row['hit'] else 'miss'}" + ("" if sel is None else f" sel {sel:.0%}")
                      + (f" quest-in-k {row['quest_in_topk_share']:.0%} oracle-in-k {row['oracle_in_topk_share']:.0%}" if "quest_in_topk_share" in row else "")
                      + (f" exact agrees {row['exact_contract_agrees']}" if "exact_contract_agrees" in row else ""), flush=True)  # fmt: skip
            del cache
        if args.hf_stock and checked:
            hf = study.hf()
            t0 = time.time()
            with torch.no_grad():
                gen = hf.generate(torch.tensor([trial["ids"]]), max_new_tokens=args.max_new, do_sample=False)
            text = tok.decode(gen[0, n:].tolist())
            results.setdefault("stock transformers (full attention)", {"config": {"attn": "full", "engine": "transformers generate"}, "trials": []})
            results["stock transformers (full attention)"]["trials"].append({**info, "answer": text, "hit": str(trial["key"]) in text,
                                                                             "seconds": round(time.time() - t0, 1)})  # fmt: skip
            print(f"    stock transformers: {text!r} {'HIT' if str(trial['key']) in text else 'miss'}", flush=True)
        write(args, argv, runs, setting, t_start, results, model_dir)  # after every trial: a cut run keeps what it did
    write(args, argv, runs, setting, t_start, results, model_dir)
    print("\n| variant | found / trials |\n|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['found']} / {r['of']} |")
    print(f"wrote {args.out}")


def write(args, argv, runs, setting, t_start, results, model_dir):
    for r in results.values():
        r["found"] = sum(x["hit"] for x in r["trials"])
        r["of"] = len(r["trials"])
    command = "python benchmarks/topk_natural_needle.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    runs = [r for r in runs if r["command"] != command]
    runs.append({"command": command, "setting": setting, "seconds": round(time.time() - t_start), "results": results})
    doc = {"task": "natural-text needle: " + NEEDLE.strip() + " inside the pinned CPython modules; question: " + QUESTION
                   + f"; chat template, the answer starts {ANSWER_START!r}; hit = the greedy answer contains the number",
           "model": model_dir.name, "corpus": corpus_info(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "method": "prefix (document) once per trial and prefix mode, then the tail (question) as one prefill chunk and "
                     "greedy decode rows per variant; see the module docstring",
           "runs": runs, "cpu": describe()}  # fmt: skip
    for run in runs:  # per-layer diagnostics only where --report reads them: the file stays small
        for name, variant in run["results"].items():
            if name not in DIAGNOSED:
                for trial in variant["trials"]:
                    trial.pop("first_step", None)
    doc["note"] = "per-layer diagnostics (first_step) kept for the variants the report reads: " + ", ".join(sorted(DIAGNOSED))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
