"""Reducers: per-batch partial aggregates and their combination (see engine.py).

Every combine is exact and order-free, so any cut of the rows into batches, on any engine,
gives the same bits: counts and correct-counts are integer sums; confidences are summed in
fixed point (int64 multiples of 2**-40: exact for every float32 confidence above 2**-17,
and within 2**-41 below); first epochs are minima; collected rows are sorted at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

FIXED_POINT_BITS = 40
FIXED_POINT_SCALE = float(2**FIXED_POINT_BITS)

_KEY_TYPES = {
    "sweep": pa.string(),
    "trial_id": pa.string(),
    "phase": pa.string(),
    "epoch": pa.int32(),
    "eval_task": pa.string(),
    "split": pa.string(),
    "example_idx": pa.int32(),
}


def _key_schema(keys: tuple[str, ...]) -> list[tuple[str, pa.DataType]]:
    return [(k, _KEY_TYPES[k]) for k in keys]


def to_fixed_point(x: pa.ChunkedArray | pa.Array) -> pa.Array:
    """floor(x * 2**40 + 0.5) as int64: every step is exact in float64 for a float32 x, and
    `AccuracySums.partial_sql` spells the same steps, so DuckDB gets the same integers."""
    scaled = pc.add(pc.multiply(pc.cast(x, pa.float64()), FIXED_POINT_SCALE), 0.5)
    return pc.cast(pc.floor(scaled), pa.int64())


def from_fixed_point(total: int) -> float:
    return total / FIXED_POINT_SCALE


@dataclass(frozen=True)
class AccuracySums:
    """Per group: rows, correct rows, and the fixed-point sum of confidence."""

    keys: tuple[str, ...] = ("sweep", "trial_id", "phase", "epoch", "eval_task", "split")

    def schema(self) -> pa.Schema:
        return pa.schema(
            [*_key_schema(self.keys), ("n", pa.int64()), ("n_correct", pa.int64()), ("conf_fx", pa.int64())]
        )

    def partial(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return self.schema().empty_table()
        t = pa.table(
            {
                **{k: batch[k] for k in self.keys},
                "correct": pc.cast(batch["correct"], pa.int64()),
                "conf_fx": to_fixed_point(batch["confidence"]),
            }
        )
        g = t.group_by(list(self.keys), use_threads=False).aggregate(
            [("correct", "count"), ("correct", "sum"), ("conf_fx", "sum")]
        )
        return self._shape(g.rename_columns([*self.keys, "n", "n_correct", "conf_fx"]))

    def partial_sql(self, source: str) -> str:
        """The same partial as one DuckDB aggregate over `source` (a subquery of the scan's
        rows), for the local engine: integer sums, so the result is bit-for-bit the one the
        batches give, without first handing every row to Arrow."""
        keys = ", ".join(self.keys)
        return (
            f"SELECT {keys}, count(*)::BIGINT AS n, sum(correct::BIGINT)::BIGINT AS n_correct, "
            f"sum(floor(confidence::DOUBLE * {FIXED_POINT_SCALE!r} + 0.5)::BIGINT)::BIGINT AS conf_fx "
            f"FROM {source} GROUP BY {keys}"
        )

    def _shape(self, t: pa.Table) -> pa.Table:
        return t.select([f.name for f in self.schema()]).cast(self.schema())

    def combine(self, parts: list[pa.Table]) -> pa.Table:
        parts = [p for p in parts if p.num_rows]
        if not parts:
            return self.schema().empty_table()
        t = pa.concat_tables([self._shape(p) for p in parts])
        g = t.group_by(list(self.keys), use_threads=False).aggregate(
            [("n", "sum"), ("n_correct", "sum"), ("conf_fx", "sum")]
        )
        g = self._shape(g.rename_columns([*self.keys, "n", "n_correct", "conf_fx"]))
        return g.sort_by([(k, "ascending") for k in self.keys])


@dataclass(frozen=True)
class FirstCrossing:
    """Per (trial, example): the first epoch of `forget_phase` with confidence <= threshold,
    and the first epoch of `learn_phase` with confidence >= threshold. The threshold is
    compared in float32, the stored type, so a stored 0.6 counts as reaching 0.6."""

    threshold: float = 0.6
    forget_phase: str = "forget"
    learn_phase: str = "relearn"
    keys: tuple[str, ...] = ("sweep", "trial_id", "example_idx")

    def schema(self) -> pa.Schema:
        return pa.schema([*_key_schema(self.keys), ("kind", pa.string()), ("epoch", pa.int32())])

    def partial(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return self.schema().empty_table()
        thr = pa.scalar(self.threshold, pa.float32())
        conf = pc.cast(batch["confidence"], pa.float32())
        out = []
        for kind, phase, hit in (
            ("forget", self.forget_phase, pc.less_equal(conf, thr)),
            ("learn", self.learn_phase, pc.greater_equal(conf, thr)),
        ):
            rows = batch.filter(pc.and_(pc.equal(batch["phase"], phase), hit))
            if rows.num_rows == 0:
                continue
            g = (
                rows.select([*self.keys, "epoch"])
                .group_by(list(self.keys), use_threads=False)
                .aggregate([("epoch", "min")])
            )
            g = g.rename_columns([*self.keys, "epoch"])
            g = g.append_column("kind", pa.array([kind] * g.num_rows, pa.string()))
            out.append(g.select([f.name for f in self.schema()]).cast(self.schema()))
        return pa.concat_tables(out) if out else self.schema().empty_table()

    def combine(self, parts: list[pa.Table]) -> pa.Table:
        parts = [p.cast(self.schema()) for p in parts if p.num_rows]
        if not parts:
            return self.schema().empty_table()
        t = pa.concat_tables(parts)
        keys = [*self.keys, "kind"]
        g = t.group_by(keys, use_threads=False).aggregate([("epoch", "min")]).rename_columns([*keys, "epoch"])
        return g.select([f.name for f in self.schema()]).cast(self.schema()).sort_by([(k, "ascending") for k in keys])


@dataclass(frozen=True)
class CollectRows:
    """The rows themselves (already narrowed by the scan), sorted by `order`: for data that is
    consumed whole by the driver (per-example confidences, hidden states for probes)."""

    order: tuple[str, ...]

    def partial(self, batch: pa.Table) -> pa.Table:
        return batch

    def combine(self, parts: list[pa.Table]) -> pa.Table:
        parts = [p for p in parts if p.num_rows]
        if not parts:
            return pa.table({})
        first = parts[0].schema
        t = pa.concat_tables([p.cast(first) for p in parts])
        types = {f.name: f.type for f in first}
        t = t.cast(pa.schema([(n, _KEY_TYPES.get(n, types[n])) for n in t.column_names]))
        return t.sort_by([(k, "ascending") for k in self.order])


@dataclass(frozen=True)
class PairedCorrect:
    """Per (sweep, trial, eval task): examples right / wrong at the finetuned and at the
    forgotten milestone, counted jointly. `milestones` names each trial's two epochs:
    (sweep, trial_id, phase, epoch, 0 for finetuned | 1 for forgotten). Partials carry one
    code per example (presence and correctness bits, summed: an example has one row per
    milestone), so the combine is an integer sum whatever the batching; only examples seen
    at both milestones are counted."""

    milestones: tuple[tuple[str, str, str, int, int], ...]
    keys: tuple[str, ...] = ("sweep", "trial_id", "eval_task", "example_idx")

    def schema(self) -> pa.Schema:
        return pa.schema(
            [*_key_schema(self.keys[:2]), ("eval_task", pa.string()), ("example_idx", pa.int32()), ("code", pa.int64())]
        )

    def partial(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return self.schema().empty_table()
        sep = "\x1f"
        names = [f"{s}{sep}{t}{sep}{p}{sep}{e}" for s, t, p, e, _ in self.milestones]
        which = pa.array([m for *_, m in self.milestones], pa.int64())
        row_key = pc.binary_join_element_wise(
            batch["sweep"], batch["trial_id"], batch["phase"], pc.cast(batch["epoch"], pa.string()), sep
        )
        pos = pc.index_in(row_key, value_set=pa.array(names, pa.string()))
        batch = batch.append_column("m", pc.take(which, pos)).filter(pc.is_valid(pos))
        # finetuned: presence 4, right 1; forgotten: presence 8, right 2
        right = pc.cast(batch["correct"], pa.int64())
        code = pc.if_else(pc.equal(batch["m"], 0), pc.add(right, 4), pc.add(pc.multiply(right, 2), 8))
        t = pa.table({**{k: batch[k] for k in self.keys}, "code": code})
        g = t.group_by(list(self.keys), use_threads=False).aggregate([("code", "sum")])
        return g.rename_columns([*self.keys, "code"]).cast(self.schema())

    def combine(self, parts: list[pa.Table]) -> pa.Table:
        out_schema = pa.schema(
            [
                *_key_schema(self.keys[:2]),
                ("eval_task", pa.string()),
                ("n11", pa.int64()),
                ("n10", pa.int64()),
                ("n01", pa.int64()),
                ("n00", pa.int64()),
            ]
        )
        parts = [p.cast(self.schema()) for p in parts if p.num_rows]
        if not parts:
            return out_schema.empty_table()
        t = pa.concat_tables(parts)
        per_example = t.group_by(list(self.keys), use_threads=False).aggregate([("code", "sum")])
        code = per_example["code_sum"]
        both = per_example.filter(pc.greater_equal(code, 12))
        bits = pc.subtract(both["code_sum"], 12)
        cols = {}
        for name, value in (("n11", 3), ("n10", 1), ("n01", 2), ("n00", 0)):
            cols[name] = pc.cast(pc.equal(bits, value), pa.int64())
        c = pa.table({"sweep": both["sweep"], "trial_id": both["trial_id"], "eval_task": both["eval_task"], **cols})
        g = c.group_by(["sweep", "trial_id", "eval_task"], use_threads=False).aggregate([(n, "sum") for n in cols])
        g = g.rename_columns(["sweep", "trial_id", "eval_task", *cols]).select(out_schema.names).cast(out_schema)
        return g.sort_by([(k, "ascending") for k in ("sweep", "trial_id", "eval_task")])
