"""The one table of cell classes, their groups, and the leukocyte formulas built from them.

Three kinds of name live here:

* **classes** — what a cell is: what the classifier outputs (``MODEL_CLASSES`` for the new
  head, ``LEGACY_MODEL_CLASSES`` for today's shipped one) or what only a technician assigns in
  review (``REVIEW_CLASSES``);
* **groups** — what a class belongs to for counting: the five-part types, immature granulocytes,
  ``abnormal_wbc``, ``nrbc`` and ``non_wbc``. A group's *kind* says how its cells enter a slide:
  leukocyte groups count toward the target; ``nrbc`` are reported per 100 counted leukocytes;
  ``non_wbc`` (platelets, smudge cells, artefacts, other) are counts only;
* **formulas** — what a lab shows: ordered rows, each a class or a group, with presets
  ``five-part`` (today's five types) and ``ru`` (the Russian-language leukocyte formula).

``abnormal_wbc`` is our name for the group of blasts and plasma cells: leukocytes that count
toward the target but belong to no five-part type and to no maturing granulocyte stage, and that
a lab always wants to see on their own.

It sits in the bottom layer, beside the config, and imports nothing from edge_wbc: the config
validates ``[formula]`` against it (check-config names the key and line of an unknown class),
and every layer above — the classifier's decision, the session, reports, MQTT, the page —
reads the same table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

UNIDENTIFIED = "unidentified"
OTHER = "other"

#: The new classifier's outputs, in the manifest's order.
MODEL_CLASSES = (
    "band_neutrophil", "segmented_neutrophil", "eosinophil", "basophil", "lymphocyte",
    "monocyte", "immature_granulocyte", "erythroblast", "platelet", OTHER,
)
#: Today's shipped classifier's outputs.
LEGACY_MODEL_CLASSES = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte", OTHER)
#: Classes no model outputs: only a technician assigns them, in review.
REVIEW_CLASSES = (
    "blast", "reactive_lymphocyte", "plasma_cell", "smudge_cell", "artefact", "giant_platelet",
    "promyelocyte", "myelocyte", "metamyelocyte",
)

COUNTED, PER_100_WBC, COUNT_ONLY = "counted", "per_100_wbc", "count_only"
KINDS = (COUNTED, PER_100_WBC, COUNT_ONLY)

#: group -> (kind, member classes); the order is the order of reports and review controls.
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "neutrophil": (COUNTED, ("neutrophil", "band_neutrophil", "segmented_neutrophil")),
    "eosinophil": (COUNTED, ("eosinophil",)),
    "basophil": (COUNTED, ("basophil",)),
    "lymphocyte": (COUNTED, ("lymphocyte", "reactive_lymphocyte")),
    "monocyte": (COUNTED, ("monocyte",)),
    "immature_granulocyte": (
        COUNTED, ("immature_granulocyte", "promyelocyte", "myelocyte", "metamyelocyte"),
    ),
    "abnormal_wbc": (COUNTED, ("blast", "plasma_cell")),
    "nrbc": (PER_100_WBC, ("erythroblast",)),
    "non_wbc": (COUNT_ONLY, ("platelet", "giant_platelet", "smudge_cell", "artefact", OTHER)),
}
#: Every class, in table order.
CLASSES: tuple[str, ...] = tuple(c for _, members in GROUPS.values() for c in members)
GROUP_OF: dict[str, str] = {c: g for g, (_, members) in GROUPS.items() for c in members}
#: The five types of a five-part differential (group names, report order).
FIVE_PART = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")

NAMES: dict[str, str] = {
    "neutrophil": "Neutrophil", "band_neutrophil": "Band neutrophil",
    "segmented_neutrophil": "Segmented neutrophil", "eosinophil": "Eosinophil",
    "basophil": "Basophil", "lymphocyte": "Lymphocyte",
    "reactive_lymphocyte": "Reactive lymphocyte", "monocyte": "Monocyte",
    "immature_granulocyte": "Immature granulocyte", "promyelocyte": "Promyelocyte",
    "myelocyte": "Myelocyte", "metamyelocyte": "Metamyelocyte", "blast": "Blast",
    "plasma_cell": "Plasma cell", "erythroblast": "Erythroblast (NRBC)",
    "platelet": "Platelet", "giant_platelet": "Giant platelet", "smudge_cell": "Smudge cell",
    "artefact": "Artefact", OTHER: "Other (not a leukocyte)", UNIDENTIFIED: "Unidentified",
    "abnormal_wbc": "Blasts and plasma cells", "nrbc": "NRBC", "non_wbc": "Not leukocytes",
}
SHORT: dict[str, str] = {
    "neutrophil": "NEU", "band_neutrophil": "BAND", "segmented_neutrophil": "SEG",
    "eosinophil": "EOS", "basophil": "BAS", "lymphocyte": "LYM", "reactive_lymphocyte": "RLY",
    "monocyte": "MON", "immature_granulocyte": "IG", "promyelocyte": "PMY", "myelocyte": "MY",
    "metamyelocyte": "MMY", "blast": "BLA", "plasma_cell": "PLC", "erythroblast": "NRBC",
    "platelet": "PLT", "giant_platelet": "GPLT", "smudge_cell": "SMU", "artefact": "ART",
    OTHER: "OTH", UNIDENTIFIED: "UNID", "abnormal_wbc": "ABN", "nrbc": "NRBC", "non_wbc": "NON",
}


def group_of(label: str) -> str:
    """The group of a class; ``unidentified`` is its own group (it counts, and waits for review)."""
    if label == UNIDENTIFIED:
        return UNIDENTIFIED
    try:
        return GROUP_OF[label]
    except KeyError:
        raise ValueError(f"unknown cell class {label!r}") from None


def kind_of(label: str) -> str:
    """How a class enters a slide: counted, per_100_wbc or count_only."""
    return COUNTED if label == UNIDENTIFIED else GROUPS[group_of(label)][0]


def is_leukocyte(label: str) -> bool:
    """Counts toward the target (``unidentified`` does: it may be any leukocyte)."""
    return kind_of(label) == COUNTED


def members(name: str) -> tuple[str, ...]:
    """The classes a formula row or flag names: a group's members, else the class itself."""
    if name in GROUPS:
        return GROUPS[name][1]
    if name in GROUP_OF:
        return (name,)
    raise ValueError(f"unknown class or group {name!r}")


# --------------------------------------------------------------------------- formulas


@dataclass(frozen=True)
class Row:
    """One line of a formula: a class or a group, and how its cells enter the slide."""

    key: str
    kind: str
    classes: tuple[str, ...]
    #: False for a row the formula does not list but a cell needed (see Formula.row_for).
    configured: bool = True

    @property
    def group(self) -> str:
        return self.key if self.key in GROUPS or self.key == UNIDENTIFIED else GROUP_OF[self.key]


@dataclass(frozen=True)
class Flag:
    """A lab's alert: ``name`` (class or group) above ``threshold`` cells or percent."""

    rule: str  # as written in the config
    name: str
    op: str  # ">" or ">="
    threshold: float
    unit: str  # "count" or "percent" (per 100 counted leukocytes)

    def raised(self, value: float) -> bool:
        return value > self.threshold if self.op == ">" else value >= self.threshold


@dataclass(frozen=True)
class Formula:
    name: str  # the preset, or "custom" when the lab changed its rows
    rows: tuple[Row, ...]
    flags: tuple[Flag, ...] = ()
    _by_class: dict[str, Row] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for r in self.rows:
            for c in r.classes:
                self._by_class[c] = r

    def row_for(self, label: str) -> Row | None:
        """Where a cell of this class is counted.

        A class the lab's rows do not list is never dropped when it matters: a leukocyte class
        gets a row of its own (counted toward the target, shown when a cell needs it), so does an
        erythroblast (per 100 leukocytes). A non-leukocyte class the rows do not list returns
        None: the cell is set aside as "not a leukocyte", as the five-part formula always did.
        """
        if label == UNIDENTIFIED:
            return UNIDENTIFIED_ROW
        row = self._by_class.get(label)
        if row is not None:
            return row
        kind = kind_of(label)
        if kind == COUNT_ONLY:
            return None
        return Row(label, kind, (label,), configured=False)

    def review_classes(self) -> list[str]:
        """What the technician may assign, formula rows first (the keyboard's 1-9), then every
        other class of the table; ``other`` is left out (rejecting says "not a leukocyte")."""
        out: list[str] = []
        for r in self.rows:
            if r.key == UNIDENTIFIED:
                continue  # only the machine leaves a cell unidentified
            # A group row offers its first member: "neutrophil" for five-part's neutrophils.
            pick = r.key if r.key in GROUP_OF else r.classes[0]
            if pick not in out:
                out.append(pick)
        out += [c for c in CLASSES if c not in out and c != OTHER]
        return out

    def describe(self) -> dict[str, object]:
        """The formula as the state, reports and MQTT carry it."""
        return {
            "name": self.name,
            "rows": [{"key": r.key, "kind": r.kind, "group": r.group, "classes": list(r.classes)}
                     for r in self.rows],
            "flags": [f.rule for f in self.flags],
            "review_classes": self.review_classes(),
            # The page's words for every class and group (one table, here).
            "names": dict(NAMES),
            "short": dict(SHORT),
        }


UNIDENTIFIED_ROW = Row(UNIDENTIFIED, COUNTED, (UNIDENTIFIED,))

#: The presets: (counted, per_100_wbc, count_only, flags).
PRESETS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # Today's differential; a blast can only appear by review, and is always worth a flag.
    "five-part": (FIVE_PART, (), (), ("blast > 0",)),
    # The leukocyte formula of a Russian-language lab report, in its order.
    "ru": (
        ("basophil", "eosinophil", "myelocyte", "metamyelocyte", "band_neutrophil",
         "segmented_neutrophil", "lymphocyte", "monocyte", "plasma_cell"),
        (), (), ("blast > 0",),
    ),
}
DEFAULT_PRESET = "five-part"

# Spaces or tabs between the parts (a rule is one line: it is shown and sent to the LIS as is).
_FLAG_RE = re.compile(
    r"^[ \t]*(?P<name>[A-Za-z_]+)[ \t]*(?P<op>>=|>)[ \t]*(?P<num>\d+(?:\.\d+)?)[ \t]*(?P<pct>%)?"
    r"[ \t]*$"
)


@dataclass(frozen=True)
class FormulaProblem:
    key: str  # "preset", "counted", "per_100_wbc", "count_only" or "flags"
    item: str | None  # the list item at fault, for its line in the file
    message: str
    nth: int = 0  # which occurrence of ``item`` in the list (a repeated item: the repeat)


def parse_flag(rule: str) -> Flag:
    """``"blast > 0"`` (cells), ``"band_neutrophil > 6%"`` (per 100 counted leukocytes)."""
    m = _FLAG_RE.match(rule)
    if not m:
        raise ValueError(f"flag {rule!r} is not '<class or group> > N' or '<class or group> > N%'"
                         " (e.g. 'blast > 0', 'eosinophil > 5%')")
    name = m.group("name")
    if name not in GROUPS and name not in GROUP_OF:
        raise ValueError(f"flag {rule!r}: {_unknown(name)}")
    op, threshold, pct = m.group("op"), float(m.group("num")), bool(m.group("pct"))
    # A rule that is raised on every slide, or on none, is a typo the lab would only find by
    # its absence (or its noise) on real slides.
    if op == ">=" and threshold == 0:
        raise ValueError(f"flag {rule!r} is raised on every slide (any number is >= 0): "
                         f"'{name} > 0' flags any")
    share = pct and kind_of(members(name)[0]) == COUNTED
    if share and (threshold > 100 or (op == ">" and threshold == 100)):
        raise ValueError(f"flag {rule!r} can never be raised: {name} is a share of the counted "
                         "leukocytes, at most 100 %")
    return Flag(" ".join(rule.split()), name, op, threshold, "percent" if pct else "count")


def build_formula(
    preset: str = DEFAULT_PRESET,
    counted: Sequence[str] | None = None,
    per_100_wbc: Sequence[str] | None = None,
    count_only: Sequence[str] | None = None,
    flags: Sequence[str] | None = None,
) -> tuple[Formula | None, list[FormulaProblem]]:
    """A formula from a preset with the lab's lists replacing the preset's; every problem."""
    problems: list[FormulaProblem] = []
    if preset not in PRESETS:
        return None, [FormulaProblem("preset", None, f"unknown preset {preset!r} (known: "
                                     f"{', '.join(PRESETS)})")]
    p_counted, p_per100, p_only, p_flags = PRESETS[preset]
    custom = any(x is not None for x in (counted, per_100_wbc, count_only))
    lists = {
        COUNTED: tuple(p_counted if counted is None else counted),
        PER_100_WBC: tuple(p_per100 if per_100_wbc is None else per_100_wbc),
        COUNT_ONLY: tuple(p_only if count_only is None else count_only),
    }
    rows: list[Row] = []
    owner: dict[str, str] = {}
    for kind, names in lists.items():
        for name in names:
            if name == UNIDENTIFIED:
                problems.append(FormulaProblem(kind, name, "'unidentified' is always counted "
                                               "and shown; it is not a formula row"))
                continue
            try:
                cls = members(name)
            except ValueError:
                problems.append(FormulaProblem(kind, name, _unknown(name)))
                continue
            natural = kind_of(cls[0])
            if natural != kind:
                problems.append(FormulaProblem(kind, name, _wrong_kind(name, natural, kind)))
                continue
            if name in owner.values() and all(owner.get(c) == name for c in cls):
                problems.append(FormulaProblem(kind, name, f"'{name}' is listed twice", nth=1))
                continue
            clash = [c for c in cls if c in owner]
            if clash:
                problems.append(FormulaProblem(
                    kind, name, f"'{clash[0]}' would be in two rows: '{owner[clash[0]]}' and "
                    f"'{name}' (a group row holds all its classes; list the classes instead)"))
                continue
            for c in cls:
                owner[c] = name
            rows.append(Row(name, kind, cls))
    parsed: list[Flag] = []
    seen: set[str] = set()
    for rule in (p_flags if flags is None else flags):
        if rule.strip() in seen:
            problems.append(FormulaProblem("flags", rule, f"flag {rule!r} is listed twice",
                                           nth=1))
            continue
        seen.add(rule.strip())
        try:
            parsed.append(parse_flag(rule))
        except ValueError as e:
            problems.append(FormulaProblem("flags", rule, str(e)))
    # A cell of a class the formula does not list is set aside uncounted when it is not a
    # leukocyte (Formula.row_for): a flag on it could never be raised.
    for f in parsed:
        cls = members(f.name)
        unlisted = [c for c in cls if c not in owner]
        if kind_of(cls[0]) == COUNT_ONLY and unlisted:
            problems.append(FormulaProblem(
                "flags", f.rule, f"flag {f.rule!r} would never be raised: the formula sets "
                f"{', '.join(unlisted)} aside uncounted; list "
                f"{' and '.join(repr(c) for c in unlisted)} under 'count_only'"))
    if problems:
        return None, problems
    # Counted rows first, then unidentified (as today), then the rest in the lab's order.
    ordered = ([r for r in rows if r.kind == COUNTED] + [UNIDENTIFIED_ROW]
               + [r for r in rows if r.kind != COUNTED])
    return Formula("custom" if custom else preset, tuple(ordered), tuple(parsed)), []


def formula_or_raise(**kw: object) -> Formula:
    """``build_formula`` for code paths that hold an already-validated config."""
    f, problems = build_formula(**kw)  # type: ignore[arg-type]
    if f is None:
        raise ValueError("; ".join(f"{p.key}: {p.message}" for p in problems))
    return f


def _unknown(name: str) -> str:
    import difflib

    known = [*CLASSES, *GROUPS]
    # Names are lower case: "Blast" is blast, said so rather than left unexplained.
    close = ([name.lower()] if name.lower() in known else
             difflib.get_close_matches(name, known, n=1, cutoff=0.7))  # fmt: skip
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown class or group '{name}'{hint}"


def _wrong_kind(name: str, natural: str, listed: str) -> str:
    what = {COUNTED: "a leukocyte and counts toward the target",
            PER_100_WBC: "reported per 100 leukocytes and does not count toward the target",
            COUNT_ONLY: "not a leukocyte and does not count toward the target"}[natural]
    return f"'{name}' is {what}: list it under '{natural}', not '{listed}'"
