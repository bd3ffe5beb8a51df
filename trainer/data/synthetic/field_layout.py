"""Field layout of the synthetic click log: which entity level each Criteo field shows, and table sizes.

Entities and their taxonomies (finest first; each field is a function of the one before it):

- user:      instance (C3, C12, C21: the same id under three salts) -> C16 -> C4 (sub-cluster) -> C24 (cluster)
- ad:        instance (C10) -> C15 -> C18 (sub-cluster) -> C2 (cluster)
- publisher: instance (C7) -> C13 (sub-cluster) -> C8 (cluster); placement C11 -> C13
- context:   instance (C26) -> C19 (sub-cluster) -> C25 (cluster) -> C20
- attributes (soft: mostly the entity level's preferred value): C1 pub-sub, C5 ad-sub, C6 user-cluster,
  C9 global, C14 ad-cluster, C17 pub-cluster, C22 context-cluster, C23 user-sub.

Contiguous id 0 of every field is reserved for "missing" (see ``hashing.token_of``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .cardinalities import CAT_FIELDS, DENSE_FIELDS, KAGGLE_CARDINALITIES, base_cardinalities  # noqa: F401 (re-exported)
from .synthetic_config import SyntheticConfig

@dataclass(frozen=True)
class EntitySpec:
    """An entity: instance fields (near-duplicates), coarser chain fields and its taxonomy levels."""

    name: str
    inst_fields: tuple[str, ...]  # fields showing the instance id (each under its own salt)
    chain: tuple[str, ...]  # coarser levels 1.. (level j+1 is a function of level j)
    sub_level: int  # level index of the sub-cluster (0 = instance)
    cluster_level: int  # level index of the cluster
    source: str | None  # whose cluster drives affinity draws (None: drawn by popularity only)
    noise: float  # multiplier of noise_token_rate for the instance fields (large fields get singletons)


ENTITIES: tuple[EntitySpec, ...] = (
    EntitySpec("user", ("C3", "C12", "C21"), ("C16", "C4", "C24"), 2, 3, None, 1.0),
    EntitySpec("ad", ("C10",), ("C15", "C18", "C2"), 2, 3, "user", 0.0),
    EntitySpec("pub", ("C7",), ("C13", "C8"), 1, 2, "user", 0.0),
    EntitySpec("ctx", ("C26",), ("C19", "C25", "C20"), 1, 2, "pub", 0.5),
)
ENTITY_BY_NAME = {e.name: e for e in ENTITIES}
#: Placement field: (field, entity, parent level). Each placement belongs to one publisher sub-cluster.
PLACEMENT = ("C11", "pub", 1)
#: Attribute fields: (field, entity or None for global, level, loyalty = P(value = level's preferred one)).
ATTRIBUTES: tuple[tuple[str, str | None, int, float], ...] = (
    ("C1", "pub", 1, 0.7), ("C5", "ad", 2, 0.7), ("C6", "user", 3, 0.6), ("C9", None, 0, 0.0),
    ("C14", "ad", 3, 0.7), ("C17", "pub", 2, 0.8), ("C22", "ctx", 2, 0.7), ("C23", "user", 2, 0.6),
)  # fmt: skip
#: Categorical fields missing together, with the Kaggle missing rate (times missing_scale).
CAT_MISSING_GROUPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("C3", "C4", "C12", "C16", "C21", "C24"), 0.034),
    (("C19", "C20", "C25", "C26"), 0.44),
    (("C6",), 0.12),
    (("C22",), 0.76),
)
#: Dense features: (median, log-sigma, driving entity, correlation with that entity's activity factor).
DENSE_SPECS: tuple[tuple[float, float, str, float], ...] = (
    (1.0, 1.3, "user", 0.6), (3.0, 2.0, "pub", 0.4), (6.0, 1.5, "user", 0.5), (4.0, 1.0, "user", 0.5),
    (2800.0, 1.8, "pub", 0.6), (33.0, 1.5, "ad", 0.4), (3.0, 1.5, "user", 0.5), (7.0, 1.0, "pub", 0.3),
    (38.0, 1.3, "ad", 0.5), (0.6, 1.0, "user", 0.6), (1.2, 1.0, "user", 0.5), (0.3, 1.5, "ad", 0.4),
    (4.0, 1.1, "user", 0.5),
)  # fmt: skip
#: Dense features missing together (0-based columns), with Kaggle-like missing rates.
DENSE_MISSING_GROUPS: tuple[tuple[tuple[int, ...], float], ...] = (
    ((0, 9), 0.454), ((2,), 0.215), ((3, 12), 0.217), ((4,), 0.026),
    ((5,), 0.223), ((6, 8, 10), 0.043), ((7,), 0.0005), ((11,), 0.766),
)  # fmt: skip
I2_NEGATIVE = (0.05, (-1, -2, -3), (0.8, 0.15, 0.05))  # P(I2 < 0) and the negative values' distribution
DENSE_MAX = 9_999_999  # integer features are clipped here (exact in float32; 7 digits in the TSV)


@dataclass
class Layout:
    """Resolved sizes: per-field table sizes, taxonomy level sizes and noise-token reserves."""

    cards: dict[str, int]  # field -> num_embeddings (contiguous ids 0..card-1; 0 = missing)
    level_sizes: dict[str, list[int]] = field(default_factory=dict)  # entity -> [instances, level1, ...]
    noise_per_day: dict[str, int] = field(default_factory=dict)  # entity -> noise ids reserved per day
    noise_rate: dict[str, float] = field(default_factory=dict)  # entity -> effective noise-token rate
    placements: int = 0  # number of C11 placements
    attr_sizes: dict[str, int] = field(default_factory=dict)  # attribute field -> number of values

    def num_embeddings(self) -> list[int]:
        """Table size per field, C1..C26."""
        return [self.cards[f] for f in CAT_FIELDS]


def scaled_cardinality(kaggle: int, cfg: SyntheticConfig) -> int:
    """``max(min(K, floor), round(K * scale))``: large fields scale, small ones keep their size."""
    return max(min(kaggle, cfg.cardinality_floor), int(round(kaggle * cfg.cardinality_scale)))


def _noise_plan(cfg: SyntheticConfig, rate: float, card: int) -> tuple[float, int]:
    """(effective rate, ids reserved per day) so each day's noise tokens stay unique (6-sigma margin).

    At most half of the field's id space is reserved; where that is too little the rate is lowered.
    """
    cap = (card - 1) // (2 * cfg.num_days)
    if rate <= 0 or cap < 32:
        return 0.0, 0
    expected = rate * cfg.rows_per_day
    if expected + 6.0 * math.sqrt(expected) + 8 > cap:
        root = (-6.0 + math.sqrt(36.0 + 4.0 * (cap - 8))) / 2.0  # solves e + 6 sqrt(e) + 8 = cap
        expected = root * root
    return expected / cfg.rows_per_day, int(math.ceil(expected + 6.0 * math.sqrt(expected) + 8))


def build_layout(cfg: SyntheticConfig) -> Layout:
    """Resolve every field's table size and the taxonomy level sizes from the config."""
    kag = dict(zip(CAT_FIELDS, base_cardinalities(cfg.table_sizes)))
    lay = Layout(cards={})
    for ent in ENTITIES:
        card = scaled_cardinality(kag[ent.inst_fields[0]], cfg)  # near-duplicates share the first's size
        rate, reserve = _noise_plan(cfg, cfg.noise_token_rate * ent.noise, card)
        n_inst = max(1, card - 1 - reserve * cfg.num_days)
        lay.noise_per_day[ent.name], lay.noise_rate[ent.name] = reserve, rate
        for f in ent.inst_fields:
            lay.cards[f] = 1 + n_inst + reserve * cfg.num_days
        sizes = [n_inst]
        for f in ent.chain:  # a coarser level has at most half the values of the finer one
            sizes.append(max(1, min(scaled_cardinality(kag[f], cfg) - 1, sizes[-1] // 2)))
            lay.cards[f] = 1 + sizes[-1]
        lay.level_sizes[ent.name] = sizes
    pf, pent, plevel = PLACEMENT
    lay.placements = max(scaled_cardinality(kag[pf], cfg) - 1, lay.level_sizes[pent][plevel])
    lay.cards[pf] = 1 + lay.placements
    for f, _, _, _ in ATTRIBUTES:
        lay.attr_sizes[f] = max(1, scaled_cardinality(kag[f], cfg) - 1)
        lay.cards[f] = 1 + lay.attr_sizes[f]
    assert set(lay.cards) == set(CAT_FIELDS), sorted(set(CAT_FIELDS) - set(lay.cards))
    return lay


def field_groups() -> dict[str, object]:
    """Structure shared by all datasets (stored in the manifest): duplicates, hierarchies, missing groups."""
    hier = [[*e.inst_fields[:1], *e.chain] for e in ENTITIES]
    deps: list[list[str]] = []
    for e in ENTITIES:
        for f in e.inst_fields:
            deps.append([f, e.chain[0]])
        deps += [[a, b] for a, b in zip(e.chain, e.chain[1:])]
    pf, pent, plevel = PLACEMENT
    parent_field = ENTITY_BY_NAME[pent].chain[plevel - 1]
    hier.append([pf, parent_field])
    deps.append([pf, parent_field])
    return {
        "near_duplicates": [list(e.inst_fields) for e in ENTITIES if len(e.inst_fields) > 1],
        "hierarchies": hier,
        "functional_dependencies": deps,
        "missing_groups": [{"fields": list(fs), "rate": r} for fs, r in CAT_MISSING_GROUPS],
        "dense_missing_groups": [
            {"fields": [DENSE_FIELDS[i] for i in cols], "rate": r} for cols, r in DENSE_MISSING_GROUPS
        ],
        "entities": {
            e.name: {
                "instance_fields": list(e.inst_fields),
                "chain": list(e.chain),
                "sub_cluster_field": ([e.inst_fields[0], *e.chain])[e.sub_level],
                "cluster_field": ([e.inst_fields[0], *e.chain])[e.cluster_level],
                "affinity_source": e.source,
            }
            for e in ENTITIES
        },
        "placement": {"field": pf, "parent": parent_field},
        "attributes": [
            {"field": f, "entity": ent, "level": lv, "loyalty": q} for f, ent, lv, q in ATTRIBUTES
        ],
    }
