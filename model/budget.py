"""On-chip memory budget of a spec, from its memory map (never counted by hand)."""

from dataclasses import dataclass

from . import contract
from .memory_map import build_memory_map

__all__ = ["BudgetRow", "Budget", "compute_budget"]


@dataclass(frozen=True)
class BudgetRow:
    item: str          # layer name or memory name
    kind: str          # "weights", "biases", "mux-select", "shifts", "activations", "scheduler"
    detail: str
    bits: int


@dataclass(frozen=True)
class Budget:
    spec_name: str
    limit_bits: int
    rows: tuple

    @property
    def total_bits(self):
        return sum(row.bits for row in self.rows)

    @property
    def fits(self):
        return self.total_bits <= self.limit_bits

    def by_kind(self):
        totals = {}
        for row in self.rows:
            totals[row.kind] = totals.get(row.kind, 0) + row.bits
        return totals

    def to_dict(self):
        return {
            "spec": self.spec_name, "limit_bits": self.limit_bits, "total_bits": self.total_bits,
            "fits": self.fits, "by_kind": self.by_kind(),
            "rows": [row.__dict__ for row in self.rows],
        }


def _padding(layer, spec, placement):
    """Padding codes of a layer's weight stream (lanes a partial tile leaves empty)."""
    per = contract.codes_per_word(layer.weight_bits, spec.hardware.weight_word_bits)
    pad = placement.weight_words * per - layer.weight_count
    return f" + {pad} padding" if pad else ""


def compute_budget(spec):
    mm = build_memory_map(spec)
    rows = []
    for layer, p in zip(spec.layers(), mm.placements):
        if not layer.has_weights:
            continue
        rows.append(BudgetRow(layer.name, "weights",
                              f"{layer.weight_count} x {layer.weight_bits}b"
                              f"{_padding(layer, spec, p)} in {p.weight_words} "
                              f"words of {mm.weight_word_bits}b", p.weight_words *
                              mm.weight_word_bits))
        rows.append(BudgetRow(layer.name, "biases",
                              f"{p.bias_words} x {mm.bias_word_bits}b (layer needs "
                              f"{layer.bias_bits}b)", p.bias_words * mm.bias_word_bits))
        if p.select_base >= 0:
            rows.append(BudgetRow(layer.name, "mux-select", f"{layer.out_channels} x 1b",
                                  layer.out_channels))
    rows.append(BudgetRow("shift table", "shifts",
                          f"{mm.shift_entries} groups x {mm.shift_bits}b",
                          mm.shift_entries * mm.shift_bits))
    # Banks are counted as the engine lays them out (power-of-two slots in act_word_bits words),
    # which can exceed the dense bit count of the largest map.
    for bank, words, dense in zip("AB", mm.bank_words, mm.bank_bits):
        rows.append(BudgetRow(f"bank {bank}", "activations",
                              f"{words} words of {mm.act_word_bits}b (largest map placed in it: "
                              f"{dense} bits)", words * mm.act_word_bits))
    rows.append(BudgetRow("bank R", "activations",
                          f"{mm.residual_words} words of {mm.act_word_bits}b (largest residual "
                          f"block input: {mm.residual_bits} bits)",
                          mm.residual_words * mm.act_word_bits))
    rows.append(BudgetRow("descriptor table", "scheduler",
                          f"{len(mm.placements)} layers x {mm.descriptor_bits}b",
                          mm.descriptor_table_bits))
    return Budget(spec.name, spec.budget_bits, tuple(rows))
