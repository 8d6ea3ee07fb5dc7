"""A DRAM model: an address trace -> row-buffer hits, commands, time and energy (seed 003 section 2.3).

The thesis measured its schedules with DRAMSim2. This model keeps what decides the energy of a
trace: one channel of ``ranks`` ranks of ``chips`` x8 chips (a 64-bit bus), ``banks`` banks of
``rows`` rows, an address mapping of row : rank : bank : column from the top bits down (a stream
fills a whole row before moving on), and an open-page policy (a row stays open until an access to
another row of its bank precharges it). Every 64-byte burst (BL8 on the 64-bit bus) is a column
read or write; a burst to a closed bank activates its row, one to another row precharges first.
Time is the data bus busy (BL/2 cycles per burst) plus, per row miss, tRP + tRCD (banks are not
overlapped: an upper bound), and a refresh every tREFI. Energy comes from ``energydram`` (Micron's
IDD x VDD method): activations (with their precharges), read and write bursts, refreshes, and
active-standby background over the elapsed time.

The default device is the Micron DDR3 2 Gb x8 part of DRAMSim2's
``ini/DDR3_micron_32M_8B_x8_sg15.ini`` (speed grade -15, DDR3-1333: tCK 1.5 ns; DRAMSim2 ships no
x8 DDR3-1600 file): 8 banks, 32768 rows, 1024 columns; CL 10, tRCD 10, tRP 10, tRAS 24, tRC 34,
tRFC 107 cycles, tREFI 7.8 us; IDD0 130, IDD2P 10, IDD2N 70, IDD3P 60, IDD3N 90, IDD4R 255,
IDD4W 300, IDD5 305 mA; VDD 1.5 V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import energydram


@dataclass(frozen=True)
class Device:
    """A DDR3 part and how many make a channel; timings in cycles of ``tck_ns``, currents in mA."""

    name: str
    banks: int
    rows: int
    columns: int
    device_width: int
    burst_length: int
    tck_ns: float
    cl: int
    trcd: int
    trp: int
    tras: int
    trc: int
    trrd: int
    trfc: int
    trefi_ns: float
    idd0: float
    idd2p: float
    idd2n: float
    idd3p: float
    idd3n: float
    idd4r: float
    idd4w: float
    idd5: float
    vdd: float
    chips: int = 8
    ranks: int = 1

    @property
    def burst_bytes(self) -> int:
        """Bytes of one burst on the channel: BL x chips x width / 8 (64 with 8 x8 chips, BL8)."""
        return self.burst_length * self.chips * self.device_width // 8

    @property
    def row_bytes(self) -> int:
        """Bytes of one row across the rank's chips (8 KiB for 1024 columns of 8 x8 chips)."""
        return self.columns * self.chips * self.device_width // 8


DDR3_1333_X8 = Device(
    name="Micron DDR3 2Gb x8 -15 (DDR3-1333), DRAMSim2 ini/DDR3_micron_32M_8B_x8_sg15.ini",
    banks=8, rows=32768, columns=1024, device_width=8, burst_length=8, tck_ns=1.5, cl=10, trcd=10, trp=10,
    tras=24, trc=34, trrd=4, trfc=107, trefi_ns=7800.0, idd0=130, idd2p=10, idd2n=70, idd3p=60, idd3n=90,
    idd4r=255, idd4w=300, idd5=305, vdd=1.5)


@dataclass(frozen=True)
class DramStats:
    """What a trace cost: command counts, row-buffer hits, time (s) and energy (pJ, by part)."""

    reads: int
    writes: int
    activates: int
    precharges: int
    refreshes: int
    row_hits: int
    time_s: float
    energy_pj: float
    energy_parts_pj: dict

    @property
    def bursts(self) -> int:
        return self.reads + self.writes

    @property
    def hit_rate(self) -> float:
        """Row-buffer hits / bursts."""
        return self.row_hits / self.bursts if self.bursts else 0.0

    @property
    def dram_bytes(self) -> int:
        return self.bursts * 64


class Dram:
    """Replays burst addresses against the banks' open rows (module docstring)."""

    def __init__(self, device: Device = DDR3_1333_X8) -> None:
        self.d = device
        self.open: dict[int, int] = {}
        self.reads = self.writes = self.activates = self.precharges = self.hits = 0

    def access(self, byte_start: int, nbytes: int, write: bool) -> None:
        """Every burst touching bytes [byte_start, byte_start + nbytes)."""
        d = self.d
        bb, rb = d.burst_bytes, d.row_bytes
        first, last = byte_start // bb, (byte_start + nbytes - 1) // bb
        per_row = rb // bb
        burst = first
        while burst <= last:
            row_index = burst // per_row  # global row number in mapping row : rank : bank : column
            bank = row_index % (d.banks * d.ranks)
            row = row_index // (d.banks * d.ranks)
            n = min(last, (row_index + 1) * per_row - 1) - burst + 1  # bursts left in this row
            current = self.open.get(bank)
            if current == row:
                self.hits += n
            else:
                if current is not None:
                    self.precharges += 1
                self.activates += 1
                self.open[bank] = row
                self.hits += n - 1
            if write:
                self.writes += n
            else:
                self.reads += n
            burst += n

    def stats(self) -> DramStats:
        """Counts, time and energy of everything accessed so far (open rows closed at the end)."""
        d = self.d
        bursts = self.reads + self.writes
        misses = self.activates
        cycles = bursts * d.burst_length // 2 + misses * (d.trp + d.trcd)
        elapsed_ns = cycles * d.tck_ns
        refreshes = int(elapsed_ns // d.trefi_ns)
        cycles += refreshes * d.trfc
        timing = energydram.Timing(RAS=d.tras, REFI=d.trefi_ns / d.tck_ns, RFC=d.trfc, RP=d.trp, RRD=d.trrd)
        idds = energydram.IDDs(idd0=d.idd0, idd2p=d.idd2p, idd2n=d.idd2n, idd3p=d.idd3p, idd3n=d.idd3n,
                               idd4r=d.idd4r, idd4w=d.idd4w, idd5=d.idd5)
        e = energydram.EnergyDDR(d.tck_ns, timing, d.vdd, idds, d.chips * d.ranks, ddr=3)
        precharges = self.precharges + len(self.open)
        parts = {"activate": e.activate_energy(num_act=self.activates),
                 "read": e.readwrite_energy(num_rd=self.reads, num_wr=0),
                 "write": e.readwrite_energy(num_rd=0, num_wr=self.writes),
                 "refresh": e.refresh_energy(num_ref=refreshes),
                 "background": e.background_energy(cycles_bankact_ckehi=cycles)}
        return DramStats(self.reads, self.writes, self.activates, precharges, refreshes, self.hits,
                         cycles * d.tck_ns * 1e-9, sum(parts.values()), parts)


def run(trace: Iterable[tuple[int, int, bool]], device: Device = DDR3_1333_X8) -> DramStats:
    """``DramStats`` of a trace of (byte address, bytes, is_write) accesses, in order."""
    dram = Dram(device)
    for start, nbytes, write in trace:
        dram.access(start, nbytes, write)
    return dram.stats()


__all__ = ["DDR3_1333_X8", "Device", "Dram", "DramStats", "run"]
