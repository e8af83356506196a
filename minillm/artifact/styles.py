"""One colour and one marker per method label, the same in every figure: the only place they are chosen.

A label's family (the pruning method behind it) gives the hue; the label's position in its family's list of
variants gives the marker (cycling through MARKERS) and a shade of the hue (base, darker, lighter), so the
(colour, marker) pair differs between any two of a family's first 30 variants. Labels not listed below (a new
profile's) get a position after the listed ones, derived from the label's text, so they too keep one style
everywhere; list them here to be sure they differ from their siblings. A few labels that share figures are pinned
to hand-picked styles (PINNED).
"""

from __future__ import annotations

import zlib

FAMILY_COLOURS = {
    "dense": "#000000",
    "random": "#7f7f7f",
    "magnitude": "#8c564b",
    "magnitude_24": "#e377c2",
    "wanda_sp": "#ff7f0e",
    "wanda_24": "#bcbd22",
    "flap": "#2ca02c",
    "taylor": "#d62728",
    "fms": "#1f77b4",
    "bonsai": "#9467bd",
    "obs": "#e6550d",
}
OTHER_COLOUR = "#17becf"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
SHADES = (0.0, -0.35, 0.35)  # base, mixed 35% with black, mixed 35% with white

# the method labels of the committed profiles, per family, in a fixed order (append, never reorder: a label's
# position is its style)
VARIANTS = {
    "dense": ["dense", "dense forward"],
    "random": ["random"],
    "magnitude": ["magnitude"],
    "magnitude_24": ["magnitude_24"],
    "wanda_sp": ["wanda_sp", "wanda_sp+comp", "wanda_sp-reconstruct"],
    "wanda_24": ["wanda_24"],
    "flap": ["flap", "flap-uniform", "flap-uniform-nocomp", "flap-reconstruct", "flap-c32x512"],
    "obs": ["obs"],
    "taylor": ["taylor", "taylor+comp", "taylor-mlp-only", "taylor-query-heads"],
    "fms": [
        "fms-gates",
        "fms-weights",
        "fms-gates-n1",
        "fms-gates-n2",
        "fms-gates-n4",
        "fms-gates-n8",
        "fms-gates-n16",
        "fms-gates-n64",
        "fms-gates-n256",
        "fms-weights-n1",
        "fms-weights-n8",
        "fms-weights-n64",
        "fms-weights-n256",
        "fms-gates-split-n32",
        "fms-gates-n2-group",
        "fms-gates-n16-group",
        "fms-gates-n64-group",
        "fms-weights-n8-group",
        "fms-gates-n16-taylor",
        "fms-weights-n8-taylor",
        "fms-gates-n16-eps1e-2",
        "fms-gates-n16-mlp-only",
        "fms-gates-n64+comp",
        "fms-ablation",
        "fms-allocation",
        "fms-allocation-n16",
        "fms-allocation-n128",
        "fms-ablation-heads",
        "fms-ablation-heads-reconstruct",
    ],
    "bonsai": ["bonsai", "bonsai-m16", "bonsai-masks16", "bonsai-1round", "bonsai-reconstruct"],
}


# Labels shown together in the accuracy figures get hand-picked styles where the rule above would give two of one
# family the same shade or the same marker (the FMS family has five labels in cpu-full's accuracy grid, more than its
# three shades): the two forward-only estimators (ablation, allocation) get hues of their own (cyan, indigo), the
# three SPSA labels three clearly different blues and markers.
PINNED = {
    "fms-gates-n64": {"color": "#1f77b4", "marker": "*"},
    "fms-weights-n64": {"color": "#9ec5e6", "marker": "s"},
    "fms-gates-split-n32": {"color": "#0b3c5d", "marker": "^"},
    "fms-ablation-heads": {"color": "#17becf", "marker": "D"},
    "fms-allocation-n128": {"color": "#393b79", "marker": "v"},
    "flap-reconstruct": {"color": "#145a14", "marker": "P"},
    "flap-c32x512": {"color": "#98df8a", "marker": "v"},
    "fms-ablation-heads-reconstruct": {"color": "#0e6f78", "marker": "P"},
    "bonsai-reconstruct": {"color": "#4b2a6e", "marker": "P"},
}


def method_family(label: str, method: str | None = None) -> str:
    """The family of a label: `method` when it is a known family, else the longest family name the label starts
    with ("fms-gates-n16" -> "fms", "wanda_sp+comp" -> "wanda_sp", "magnitude_24" -> "magnitude_24"), else
    "other"."""
    if not isinstance(label, str) or not label:
        raise ValueError(f"a method label must be a non-empty string, got {label!r}")
    if method in FAMILY_COLOURS:
        return method
    for family in VARIANTS:
        if label in VARIANTS[family]:
            return family
    matches = [f for f in FAMILY_COLOURS if label == f or label.startswith(f)]
    return max(matches, key=len) if matches else "other"


def _shade(colour: str, amount: float) -> str:
    rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    target = 1.0 if amount > 0 else 0.0
    mixed = [c + abs(amount) * (target - c) for c in rgb]
    return "#" + "".join(f"{round(255 * c):02x}" for c in mixed)


def method_style(label: str, method: str | None = None) -> dict:
    """{"color": hex colour, "marker": matplotlib marker} of a method label (`method`, the record's method name,
    when known, picks the family). The same label always gets the same style."""
    family = method_family(label, method)
    if label in PINNED:
        return dict(PINNED[label])
    listed = VARIANTS.get(family, [])
    if label in listed:
        position = listed.index(label)
    else:  # not listed: a stable position after the listed ones
        position = len(listed) + zlib.crc32(label.encode()) % 30
    colour = FAMILY_COLOURS.get(family, OTHER_COLOUR)
    return {"color": _shade(colour, SHADES[position % len(SHADES)]), "marker": MARKERS[position % len(MARKERS)]}


def is_listed(label: str) -> bool:
    """Whether the label has a fixed position in VARIANTS (its style cannot collide with a sibling's)."""
    return any(label in variants for variants in VARIANTS.values())
