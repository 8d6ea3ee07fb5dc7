"""The accelerator's hardware description: a TOML file loaded into typed dataclasses.

Keys carry their unit in the name (``freq_hz``, ``fbuf_in_bytes``, ``feature_bytes_per_s``). The
default, ``configs/seed002.toml`` (package data), is seed 002's machine (section 4.2). A bad file
gets a ``ConfigError`` naming the key, the value and the unit expected.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT = "seed002.toml"


class ConfigError(ValueError):
    """A hardware description that cannot be used; the message names the key and the unit."""


@dataclass(frozen=True)
class Array:
    """The PU array (seed 002 section 3.1, Fig. 3): ``pu_rows`` x ``pu_cols`` PUs of ``macs_per_pu``
    MACs at ``freq_hz``; a column computes one output channel, a row takes ifmap rows."""

    pu_rows: int
    pu_cols: int
    macs_per_pu: int
    freq_hz: float

    @property
    def macs(self) -> int:
        """MACs of the whole array (seed 002: 16 x 32 x 32 = 16,384)."""
        return self.pu_rows * self.pu_cols * self.macs_per_pu


@dataclass(frozen=True)
class Buffers:
    """On-chip SRAM, bytes, whole-chip totals (seed 002 section 4.2)."""

    fbuf_in_bytes: int
    wbuf_bytes: int
    fbuf_out_bytes: int
    bbuf_bytes: int


@dataclass(frozen=True)
class Dram:
    """Off-chip bandwidth, bytes/s: to the feature buffers and to Wbuf/Bbuf (seed 002 section 4.2)."""

    feature_bytes_per_s: float
    weight_bytes_per_s: float


@dataclass(frozen=True)
class Data:
    """Element sizes, bytes: operands (16-bit) and accumulators (32-bit)."""

    element_bytes: int
    accum_bytes: int


@dataclass(frozen=True)
class Fusion:
    """The units added for fusion (seed 002 sections 3.1, 4.2, Figs. 4-5): PreU MACs per PU row,
    PostU MACs per two PUs, DivSqrt units per column."""

    preu_macs_per_row: int
    postu_macs_per_pu_pair: int
    divsqrt_per_col: int


@dataclass(frozen=True)
class Assumptions:
    """What the seed does not give, fixed before comparing (issue 15). (The other one is not a key:
    with no VecU throughput in the seed, an unfused BN, ReLU or Add pass is bound by its off-chip
    transfers at ``Dram.feature_bytes_per_s``.)

    Attributes:
        fused_fbuf_in_share: share of Fbuf_In a fused layer keeps its raw inputs in (the rest holds
            the pre-processed values, seed 002 section 3.2.1).
    """

    fused_fbuf_in_share: float


@dataclass(frozen=True)
class AccelConfig:
    """A whole hardware description (one TOML file: one table per attribute)."""

    array: Array
    buffers: Buffers
    dram: Dram
    data: Data
    fusion: Fusion
    assumptions: Assumptions
    source: str = DEFAULT

    def with_value(self, key: str, value: float) -> "AccelConfig":
        """This configuration with ``key`` ("dram.feature_bytes_per_s", "array.pu_rows") set.

        Raises:
            ConfigError: unknown key, or a value out of range for its unit.
        """
        section, _, name = key.partition(".")
        table = getattr(self, section, None) if section in _SECTIONS else None
        if table is None or name not in {f.name for f in fields(table)}:
            raise ConfigError(f"unknown key {key!r}; keys are {', '.join(all_keys())}")
        return replace(self, **{section: replace(table, **{name: _value(section, name, value, self.source)})})


_SECTIONS = {"array": Array, "buffers": Buffers, "dram": Dram, "data": Data, "fusion": Fusion,
             "assumptions": Assumptions}


def all_keys() -> list[str]:
    """Every ``section.key`` of a configuration, in file order."""
    return [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in fields(cls)]


def unit_of(name: str) -> str:
    """What a key's value must be, from its name's unit suffix."""
    if name.endswith("_flops_per_s"):
        return "a rate in FLOP/s (> 0)"
    if name.endswith("_bytes_per_s"):
        return "a bandwidth in bytes/s (> 0)"
    if name.endswith("_hz"):
        return "a frequency in Hz (> 0)"
    if name.endswith("_bytes"):
        return "a size in bytes (integer > 0)"
    if name.endswith("_share"):
        return "a fraction in (0, 1]"
    return "a count (integer > 0)"


def _value(section: str, name: str, value, source: str):
    unit = unit_of(name)
    bad = ConfigError(f"{source}: [{section}] {name} = {value!r}: expected {unit}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    integer = unit.endswith("(integer > 0)")
    if integer and value != int(value):
        raise bad
    if value <= 0 or (name.endswith("_share") and value > 1):
        raise bad
    return int(value) if integer else float(value)


def parse(data: dict, source: str) -> AccelConfig:
    """A configuration from parsed TOML ``data``.

    Raises:
        ConfigError: a missing or unknown table or key, or a value of the wrong unit.
    """
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown table [{unknown[0]}]; tables are {', '.join(_SECTIONS)}")
    tables = {}
    for section, cls in _SECTIONS.items():
        tables[section] = cls(**_table(data, section, [f.name for f in fields(cls)], source))
    return AccelConfig(**tables, source=source)


def _table(data: dict, section: str, names: list[str], source: str) -> dict:
    """The checked values of table ``[section]`` with exactly the keys ``names``.

    Raises:
        ConfigError: the table is missing, or a key is unknown, missing or of the wrong unit.
    """
    given = data.get(section)
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: missing table [{section}] (keys {', '.join(names)})")
    extra = sorted(set(given) - set(names))
    if extra:
        raise ConfigError(f"{source}: unknown key [{section}] {extra[0]}; expected one of {', '.join(names)}")
    missing = [n for n in names if n not in given]
    if missing:
        raise ConfigError(f"{source}: missing key [{section}] {missing[0]}: {unit_of(missing[0])}")
    return {n: _value(section, n, given[n], source) for n in names}


def load(path: str | Path | None = None) -> AccelConfig:
    """Load a hardware description; None: the shipped ``configs/seed002.toml``.

    Raises:
        ConfigError: unreadable TOML, or as ``parse``.
        FileNotFoundError: no such file.
    """
    data, source = _read(path, DEFAULT)
    return parse(data, source)


@dataclass(frozen=True)
class RooflineConfig:
    """A machine as a roofline (a GPU): peak FLOP/s, off-chip bytes/s, element size; no PreU or
    PostU, so every memory-bound layer is a pass of its own (issue 15). ``source``: the file."""

    peak_flops_per_s: float
    dram_bytes_per_s: float
    element_bytes: int
    source: str = ""


ROOFLINES = {"rtx2080ti": "rtx2080ti.toml", "v100": "v100.toml"}
"""Shipped roofline machines: name -> file in ``configs/``."""


def _read(path: str | Path | None, default: str) -> tuple[dict, str]:
    if path is None:
        text, source = resources.files("bnff.accel").joinpath("configs", default).read_text(), default
    else:
        text, source = Path(path).read_text(), str(path)
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None


def load_roofline(name_or_path: str) -> RooflineConfig:
    """A roofline machine: a shipped name (``ROOFLINES``: "rtx2080ti", "v100") or a TOML file with
    one table ``[roofline]`` holding ``peak_flops_per_s``, ``dram_bytes_per_s``, ``element_bytes``.

    Raises:
        ConfigError: a missing, unknown or out-of-range key (named with its unit).
        FileNotFoundError: neither a shipped name nor a file (the message lists the shipped names).
    """
    shipped = ROOFLINES.get(name_or_path)
    if shipped is None and not Path(name_or_path).is_file():
        raise FileNotFoundError(f"--gpu {name_or_path}: neither a built-in machine ({', '.join(sorted(ROOFLINES))}) "
                                f"nor a TOML file")
    data, source = _read(None if shipped else name_or_path, shipped or "")
    names = [f.name for f in fields(RooflineConfig) if f.name != "source"]
    if set(data) - {"roofline"}:
        raise ConfigError(f"{source}: a roofline file has one table, [roofline] ({', '.join(names)})")
    return RooflineConfig(**_table(data, "roofline", names, source), source=source)


__all__ = ["AccelConfig", "Array", "Assumptions", "Buffers", "ConfigError", "Data", "Dram", "Fusion",
           "ROOFLINES", "RooflineConfig", "all_keys", "load", "load_roofline", "parse", "unit_of"]
