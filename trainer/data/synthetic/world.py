"""The hidden world: who meets whom, the true logit, and what the 26 + 13 observed columns show.

``World.sample_hidden`` draws the hidden state of a block of rows (entities, attributes, dense drivers and
the raw logit); ``World.emit`` turns it into contiguous categorical ids (salts, hierarchies, singleton noise
tokens, group-wise missingness) and integer count features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .synthetic_config import SyntheticConfig
from .entities import EntityModel, assign_parents, zipf_rank
from .keyed_random import derive_key, hash_normal, hash_uniform
from .field_layout import (
    ATTRIBUTES, CAT_FIELDS, CAT_MISSING_GROUPS, DENSE_MAX, DENSE_MISSING_GROUPS, DENSE_SPECS, ENTITIES,
    I2_NEGATIVE, PLACEMENT, Layout,
)  # fmt: skip

#: Latent interaction terms: (entity, entity, weight); main effects: (entity, weight).
PAIRS = (("user", "ad", 1.0), ("user", "pub", 0.6), ("ad", "ctx", 0.4))
MAINS = (("user", 0.5), ("ad", 0.6), ("pub", 0.4), ("ctx", 0.3))
BIASES = (("user", 0.35), ("ad", 0.6), ("pub", 0.45), ("ctx", 0.3))
_COL = {f: i for i, f in enumerate(CAT_FIELDS)}
_MU = np.log([s[0] for s in DENSE_SPECS])
_SIGMA = np.array([s[1] for s in DENSE_SPECS])


@dataclass
class Hidden:
    """Hidden state of a block of rows."""

    levels: dict[str, list[np.ndarray]]  # entity -> taxonomy levels per row, instance first
    placement: np.ndarray  # C11 placement per row
    attrs: dict[str, np.ndarray]  # attribute field -> true value per row
    dense: np.ndarray  # (n, 13) int64 observed integer features (0 where missing)
    dmiss: np.ndarray  # (n, 13) bool, True where the integer feature is missing
    raw: np.ndarray  # (n,) uncalibrated logit


def _affine_perm(rng: np.random.Generator, n: int) -> tuple[int, int, int]:
    """Parameters (a, b, n) of the bijection v -> (a * v + b) mod n (a salt of a field's id space)."""
    if n <= 1:
        return 1, 0, max(n, 1)
    a = int(rng.integers(1, n)) | 1
    while math.gcd(a, n) != 1:
        a += 2
    return a % n or 1, int(rng.integers(0, n)), n


def _apply(p: tuple[int, int, int], v: np.ndarray) -> np.ndarray:
    a, b, n = p
    return (v.astype(np.int64) * a + b) % n


def _csr(parent: np.ndarray, n_parent: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Children grouped by parent: (members, starts, counts)."""
    counts = np.bincount(parent, minlength=n_parent)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return np.argsort(parent, kind="stable").astype(np.int32), starts, counts


class World:
    """Everything fixed by (config, seed): taxonomies, latents, salts and label-model coefficients."""

    def __init__(self, cfg: SyntheticConfig, layout: Layout) -> None:
        self.cfg, self.layout = cfg, layout
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5EED]))
        self.ents = {
            e.name: EntityModel(e, layout.level_sizes[e.name], cfg, rng, tag=i + 1) for i, e in enumerate(ENTITIES)
        }
        pf, pent, plevel = PLACEMENT
        self.pl_parent = assign_parents(rng, layout.placements, layout.level_sizes[pent][plevel])
        self.pl_members, self.pl_starts, self.pl_counts = _csr(self.pl_parent, layout.level_sizes[pent][plevel])
        self.perm: dict[str, tuple[int, int, int]] = {}
        self.noise_perm: dict[str, tuple[int, int, int]] = {}
        for e in ENTITIES:
            sizes = layout.level_sizes[e.name]
            for f in e.inst_fields:
                self.perm[f] = _affine_perm(rng, sizes[0])
            for j, f in enumerate(e.chain):
                self.perm[f] = _affine_perm(rng, sizes[j + 1])
            self.noise_perm[e.name] = _affine_perm(rng, layout.noise_per_day[e.name])
        self.perm[pf] = _affine_perm(rng, layout.placements)
        for f, _, _, _ in ATTRIBUTES:
            self.perm[f] = _affine_perm(rng, layout.attr_sizes[f])
        c = rng.standard_normal(len(DENSE_SPECS))
        self.dense_coef = c / np.linalg.norm(c)
        self.key_pref = {f: derive_key(cfg.seed, 100 + i) for i, (f, *_) in enumerate(ATTRIBUTES)}
        self.key_effect = {f: derive_key(cfg.seed, 200 + i) for i, (f, *_) in enumerate(ATTRIBUTES)}

    # ------------------------------------------------------------------------------------------- hidden
    def sample_hidden(self, rng: np.random.Generator, day: int, n: int) -> Hidden:
        """Draw who meets whom, attributes, dense drivers and the raw logit for ``n`` rows of ``day``."""
        cfg, ents = self.cfg, self.ents
        lv: dict[str, list[np.ndarray]] = {}
        lv["user"] = ents["user"].levels(ents["user"].draw_popular(rng, n, day))
        for e in ENTITIES[1:]:
            src = ENTITIES[[x.name for x in ENTITIES].index(e.source)] if e.source else None
            assert src is not None and src.name in lv
            inst = ents[e.name].draw_affine(rng, day, lv[src.name][src.cluster_level])
            lv[e.name] = ents[e.name].levels(inst)
        _, pent, plevel = PLACEMENT
        parent = lv[pent][plevel]
        r = np.floor(rng.random(n) * self.pl_counts[parent]).astype(np.int64)
        placement = self.pl_members[self.pl_starts[parent] + r].astype(np.int64)
        attrs: dict[str, np.ndarray] = {}
        for f, ent, level, loyalty in ATTRIBUTES:
            size = self.layout.attr_sizes[f]
            val = zipf_rank(rng.random(n), size, 1.0)
            if ent is not None:
                pref = zipf_rank(hash_uniform(self.key_pref[f], lv[ent][level]), size, 1.0)
                val = np.where(rng.random(n) < loyalty, pref, val)
            attrs[f] = val
        act = {e: ents[e].activity(lv[e][0]) for e in {spec[2] for spec in DENSE_SPECS}}
        z = rng.standard_normal((n, len(DENSE_SPECS)))
        for j, (_, _, ent, rho) in enumerate(DENSE_SPECS):
            z[:, j] = rho * act[ent] + math.sqrt(1.0 - rho * rho) * z[:, j]
        dense, dmiss = self._dense(rng, z)
        raw = self._raw_logit(lv, attrs, dense, dmiss)
        return Hidden(lv, placement, attrs, dense, dmiss, raw)

    def _dense(self, rng: np.random.Generator, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer count features from Gaussian drivers: log-normal counts, I2 negatives, group missingness."""
        n = z.shape[0]
        dense = np.floor(np.exp(_MU + _SIGMA * z) - 0.5)
        dense = np.clip(dense, 0, DENSE_MAX).astype(np.int64)
        p_neg, neg_vals, neg_p = I2_NEGATIVE
        neg = np.flatnonzero(rng.random(n) < p_neg)
        dense[neg, 1] = rng.choice(np.array(neg_vals), size=neg.size, p=np.array(neg_p))
        dmiss = np.zeros(dense.shape, dtype=bool)
        for cols, rate in DENSE_MISSING_GROUPS:
            rows = np.flatnonzero(rng.random(n) < min(rate * self.cfg.missing_scale, 0.99))
            dmiss[np.ix_(rows, np.array(cols, dtype=np.int64))] = True
        dense[dmiss] = 0
        return dense, dmiss

    def _raw_logit(
        self, lv: dict[str, list[np.ndarray]], attrs: dict[str, np.ndarray], dense: np.ndarray, dmiss: np.ndarray
    ) -> np.ndarray:
        """Uncalibrated logit: latent interactions + per-instance biases + attribute + dense terms."""
        cfg, k = self.cfg, self.cfg.latent_dim
        lat = {e: self.ents[e].latent(lv[e]) for e in self.ents}
        inter = sum(w * np.einsum("ij,ij->i", lat[a], lat[b]) for a, b, w in PAIRS)
        inter = inter + sum(w * (lat[e] @ self.ents[e].main) for e, w in MAINS)
        norm = math.sqrt(sum(w * w for *_, w in PAIRS) + sum(w * w for _, w in MAINS))
        inter = inter * (math.sqrt(k) / norm)
        tok = sum(w * self.ents[e].bias(lv[e][0]) for e, w in BIASES) / math.sqrt(sum(w * w for _, w in BIASES))
        attr = sum(hash_normal(self.key_effect[f], v) for f, v in attrs.items()) / math.sqrt(len(attrs))
        zhat = np.where(dmiss, 0.0, (np.log1p(np.maximum(dense, 0)) - _MU) / _SIGMA)  # observed, so learnable
        dense_term = zhat @ self.dense_coef
        return (
            cfg.interaction_weight * inter
            + cfg.token_effect_weight * tok
            + cfg.attribute_weight * cfg.semantic_strength * attr
            + cfg.dense_weight * dense_term
        )

    # --------------------------------------------------------------------------------------------- emit
    def emit(
        self, hid: Hidden, rng: np.random.Generator, day: int, noise_used: dict[str, int]
    ) -> np.ndarray:
        """Observed categorical columns: sparse (n, 26) int32 contiguous ids (0 = missing).

        ``noise_used`` counts the noise tokens issued so far today per entity (updated in place), so every
        noise token of a day is a fresh id.
        """
        cfg, lay = self.cfg, self.layout
        n = hid.raw.shape[0]
        sparse = np.empty((n, len(CAT_FIELDS)), dtype=np.int32)
        for e in ENTITIES:
            lv, n_inst, reserve = hid.levels[e.name], lay.level_sizes[e.name][0], lay.noise_per_day[e.name]
            noisy = np.flatnonzero(rng.random(n) < lay.noise_rate[e.name]) if reserve > 0 else np.empty(0, np.int64)
            u = (noise_used.get(e.name, 0) + np.arange(noisy.size)) % max(reserve, 1)
            noise_used[e.name] = noise_used.get(e.name, 0) + noisy.size
            noise_ids = 1 + n_inst + day * reserve + _apply(self.noise_perm[e.name], u)
            for f in e.inst_fields:
                col = 1 + _apply(self.perm[f], lv[0])
                col[noisy] = noise_ids
                sparse[:, _COL[f]] = col
            for j, f in enumerate(e.chain):
                sparse[:, _COL[f]] = 1 + _apply(self.perm[f], lv[j + 1])
        sparse[:, _COL[PLACEMENT[0]]] = 1 + _apply(self.perm[PLACEMENT[0]], hid.placement)
        for f, v in hid.attrs.items():
            sparse[:, _COL[f]] = 1 + _apply(self.perm[f], v)
        for fields, rate in CAT_MISSING_GROUPS:
            rows = np.flatnonzero(rng.random(n) < min(rate * cfg.missing_scale, 0.99))
            sparse[np.ix_(rows, np.array([_COL[f] for f in fields], dtype=np.int64))] = 0
        return sparse
