"""Entity taxonomies, popularity, novelty and affinity draws (the generator's hidden "world").

Instance ids of an entity are in birth order: ids ``[0, p0)`` exist from day 0 and a cohort of ``pc`` new
ids is born on each later day, so the ids alive on day ``d`` are the prefix ``[0, p0 + d * pc)``.
Popularity is a truncated Zipf over that prefix (older = more popular), plus a ``new_id_rate`` share of
draws from the recent cohorts (trending new ids). Affinity draws pick a favourite cluster of the source
entity's cluster and a Zipf-popular alive member of it.
"""

from __future__ import annotations

import numpy as np

from .synthetic_config import SyntheticConfig
from .keyed_random import derive_key, hash_normal, hash_u64
from .field_layout import EntitySpec

NUM_FAVOURITES = 4  # favourite target clusters per source cluster


def zipf_rank(u: np.ndarray, n: np.ndarray | int, a: float) -> np.ndarray:
    """Truncated continuous-Zipf inverse CDF: uniforms ``u`` -> ranks in ``[0, n)`` with P ~ (r+1)^-a."""
    n1 = np.asarray(n, dtype=np.float64) + 1.0
    if abs(a - 1.0) < 1e-9:
        x = np.exp(u * np.log(n1))
    else:
        x = (1.0 + u * (n1 ** (1.0 - a) - 1.0)) ** (1.0 / (1.0 - a))
    r = np.floor(x).astype(np.int64) - 1
    return np.clip(r, 0, np.asarray(n, dtype=np.int64) - 1)


def assign_parents(rng: np.random.Generator, n_child: int, n_parent: int) -> np.ndarray:
    """Random many-to-one map child -> parent in which every parent has at least one child."""
    extra = rng.integers(0, n_parent, size=n_child - n_parent, dtype=np.int64)
    parents = np.concatenate([np.arange(n_parent, dtype=np.int64), extra])
    return rng.permutation(parents).astype(np.int32)


class EntityModel:
    """One entity: taxonomy parent maps, cohorts, cluster membership and latent tables."""

    def __init__(
        self, spec: EntitySpec, sizes: list[int], cfg: SyntheticConfig, rng: np.random.Generator, tag: int
    ) -> None:
        self.spec, self.sizes, self.cfg = spec, sizes, cfg
        self.parents = [assign_parents(rng, sizes[j], sizes[j + 1]) for j in range(len(sizes) - 1)]
        n, days = sizes[0], cfg.num_days
        self.pc = int(n * cfg.growth_fraction / (days - 1)) if days > 1 else 0
        self.p0 = n - self.pc * (days - 1)
        cluster = self.level(np.arange(n, dtype=np.int64), spec.cluster_level)
        n_cl = sizes[spec.cluster_level]
        self.members = np.argsort(cluster, kind="stable").astype(np.int32)  # by cluster, then id (age)
        counts = np.bincount(cluster, minlength=n_cl)
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.alive_counts = [np.bincount(cluster[: self.alive(d)], minlength=n_cl) for d in range(days)]
        k = cfg.latent_dim
        self.t_cluster = (rng.standard_normal((n_cl, k)) / np.sqrt(k)).astype(np.float32)
        self.t_sub = (rng.standard_normal((sizes[spec.sub_level], k)) / np.sqrt(k)).astype(np.float32)
        main = rng.standard_normal(k)
        self.main = main / np.linalg.norm(main)
        self.key_latent = derive_key(cfg.seed, tag, 1)
        self.key_bias = derive_key(cfg.seed, tag, 2)
        self.key_activity = derive_key(cfg.seed, tag, 3)
        self.key_fav = derive_key(cfg.seed, tag, 4)

    def alive(self, day: int) -> int:
        """Number of instance ids alive on ``day`` (a prefix of the id range)."""
        return self.p0 + day * self.pc

    def level(self, inst: np.ndarray, j: int) -> np.ndarray:
        """Taxonomy level ``j`` (0 = instance) of instances."""
        v = inst
        for p in self.parents[:j]:
            v = p[v]
        return v

    def levels(self, inst: np.ndarray) -> list[np.ndarray]:
        """All levels of instances, finest first."""
        out = [inst]
        for p in self.parents:
            out.append(p[out[-1]].astype(np.int64))
        return out

    def draw_popular(self, rng: np.random.Generator, n: int, day: int) -> np.ndarray:
        """Instances by popularity: Zipf over alive ids, ``new_id_rate`` of them from recent cohorts."""
        a = self.cfg.zipf_exponent
        inst = zipf_rank(rng.random(n), self.alive(day), a)
        fresh = rng.random(n) < self.cfg.new_id_rate
        if day > 0 and self.pc > 0:
            k = int(fresh.sum())
            back = np.minimum(rng.geometric(0.5, size=k) - 1, day - 1)
            cohort = day - back  # 1..day, mostly today's
            inst[fresh] = self.p0 + (cohort - 1) * self.pc + zipf_rank(rng.random(k), self.pc, a)
        return inst

    def draw_affine(self, rng: np.random.Generator, day: int, source_cluster: np.ndarray) -> np.ndarray:
        """Instances drawn with affinity to the source entity's cluster (else by popularity)."""
        n = source_cluster.shape[0]
        inst = self.draw_popular(rng, n, day)
        use = np.flatnonzero(rng.random(n) < self.cfg.affinity)
        j = zipf_rank(rng.random(use.size), NUM_FAVOURITES, 1.0)
        n_cl = self.sizes[self.spec.cluster_level]
        fav = hash_u64(self.key_fav, source_cluster[use] * NUM_FAVOURITES + j) % np.uint64(n_cl)
        target = fav.astype(np.int64)
        cnt = self.alive_counts[day][target]
        r = zipf_rank(rng.random(use.size), np.maximum(cnt, 1), self.cfg.zipf_exponent)
        ok = cnt > 0
        inst[use[ok]] = self.members[self.starts[target[ok]] + r[ok]]
        return inst

    def latent(self, lv: list[np.ndarray]) -> np.ndarray:
        """Latent vectors (n, k): sqrt(s) * cluster/sub-cluster part + sqrt(1 - s) * instance part."""
        s, k = self.cfg.semantic_strength, self.cfg.latent_dim
        v = np.zeros((lv[0].shape[0], k), dtype=np.float64)
        if s > 0:
            c = self.cfg.cluster_share
            v += np.sqrt(s * c) * self.t_cluster[lv[self.spec.cluster_level]]
            v += np.sqrt(s * (1.0 - c)) * self.t_sub[lv[self.spec.sub_level]]
        if s < 1:
            v += np.sqrt((1.0 - s) / k) * hash_normal(self.key_latent, lv[0], k)
        return v

    def bias(self, inst: np.ndarray) -> np.ndarray:
        """Per-instance label bias (cannot be shared with any other token)."""
        return hash_normal(self.key_bias, inst)

    def activity(self, inst: np.ndarray) -> np.ndarray:
        """Per-instance activity factor driving the dense count features."""
        return hash_normal(self.key_activity, inst)
