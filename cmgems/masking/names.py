"""The masking vocabulary, in one place: the names everything else imports.

- A *masking* selects which tokens of a sample are predicted: random (DNABERT's k-spans), genemask
  (GeneMask's NPMI-ranked spans) or global (the top-NPMI positions); cmgems.masking.maskings
  implements them.
- A *mode* says which masking each step uses: `fixed:<masking>` throughout, or a curriculum,
  cm_step (random turning into global) or cm_gems (genemask until validation perplexity stops
  dropping, then global); cmgems.masking.curriculum implements them.
- A comparison (cmgems.compare) pretrains one run per mode and calls each by its short name:
  the masking of a fixed mode, the curriculum's own name otherwise.

Torch-free: configs, launchers and reports import it without the masking code.
"""
from __future__ import annotations

from dataclasses import dataclass

from cmgems.errors import InputError

MASKINGS = ("random", "genemask", "global")
# The maskings that rank tokens by NPMI (and so need a dataset whose table scores its k-mers).
PMI_MASKINGS = ("genemask", "global")
# Centre (random, genemask) or anchor (global) probabilities from DNABERT, GeneMask and CM-GEMS.
DEFAULT_PROBABILITY = {"random": 0.025, "genemask": 0.0176, "global": 0.0136}
# Where a PMI masking reads a token's NPMI: from the k-mer at that position ("token", the papers'
# text), or from the k-mer whose token id equals the position index ("position", as the authors'
# code decodes a position as if it were an id: the same scores for every sequence).
PMI_LOOKUPS = ("token", "position")
# GeneMask's kept anchors once a sample has 9+ centres: the ceil(n/2) best by NPMI ("top",
# GeneMask's rule) or those of the first ceil(n/2) centres ("first", the published CM-GEMS
# script's GeneMask stage, which takes them before sorting).
ANCHOR_ORDERS = ("top", "first")
# GLOBAL's m drawn as the number of Bernoulli(p) centres of the sample, as the published code.
GLOBAL_M_BINOMIAL = "binomial"
# The masking every run is also evaluated with, whatever its own: ppl_ref compares runs.
REFERENCE_MASKING = "random"

FIXED_PREFIX = "fixed:"
CM_STEP, CM_GEMS = "cm_step", "cm_gems"
CURRICULA = (CM_STEP, CM_GEMS)
# cm_step blends random into global; cm_gems goes from genemask to global.
CURRICULUM_MASKINGS = {CM_STEP: ("random", "global"), CM_GEMS: ("genemask", "global")}
# Every mode: one fixed masking, or one of the two curricula (the fixed baselines first).
MODES = tuple(FIXED_PREFIX + m for m in MASKINGS) + CURRICULA


def _check_choice(what: str, name, choices: tuple[str, ...]) -> str:
    """name, if it is one of `choices`; else InputError naming them."""
    if name not in choices:
        raise InputError(f"{what}: unknown {name!r} (expected one of {', '.join(choices)})")
    return name


def check_pmi_lookup(name) -> str:
    return _check_choice("pmi_lookup", name, PMI_LOOKUPS)


def check_anchor_order(name) -> str:
    return _check_choice("genemask_anchor_order", name, ANCHOR_ORDERS)


def check_global_m(global_m) -> int | str:
    """global_m, if it is an integer >= 0 or "binomial"; else InputError."""
    if global_m != GLOBAL_M_BINOMIAL and (not isinstance(global_m, int) or
                                          isinstance(global_m, bool) or global_m < 0):
        raise InputError(f"masking global_m: must be an integer >= 0 (0 = per sample) or "
                         f"{GLOBAL_M_BINOMIAL!r}, got {global_m!r}")
    return global_m


def check_masking(name) -> str:
    return _check_choice("masking strategy", name, MASKINGS)


@dataclass(frozen=True)
class Mode:
    """A parsed mode: `fixed` is its masking for fixed:<masking>, None for a curriculum."""
    name: str
    fixed: str | None

    @property
    def curriculum(self) -> str | None:
        return None if self.fixed else self.name

    @property
    def short_name(self) -> str:
        """What a comparison calls it: 'random' for fixed:random, 'cm_gems' for cm_gems."""
        return self.fixed or self.name

    @property
    def first_masking(self) -> str:
        """The masking it starts with: what its frozen validation masking uses by default."""
        return self.fixed or CURRICULUM_MASKINGS[self.name][0]

    @property
    def uses_pmi(self) -> bool:
        return self.fixed is None or self.fixed in PMI_MASKINGS


def parse_mode(mode) -> Mode:
    """The mode named `mode`; InputError for anything else, naming the choices."""
    if mode not in MODES:
        raise InputError(f"curriculum: unknown mode {mode!r} (expected "
                         f"{FIXED_PREFIX}{'|'.join(MASKINGS)}, {CM_STEP} or {CM_GEMS})")
    return Mode(mode, mode[len(FIXED_PREFIX):] if mode.startswith(FIXED_PREFIX) else None)


def uses_pmi(name: str) -> bool:
    """Whether a mode or a masking ranks tokens by NPMI: everything but random."""
    return name in PMI_MASKINGS or (name in MODES and parse_mode(name).uses_pmi)


# A comparison's name of each mode -> the mode, in MODES' order.
MODE_OF_SHORT_NAME = {parse_mode(m).short_name: m for m in MODES}
