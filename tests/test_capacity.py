"""node/capacity.py: the receive policy (limiter, free disk) and its cached disk probe."""

from __future__ import annotations

import dataclasses
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from node.app import build_limiter
from node.capacity import ReceiveCapacity
from node.config import Config, LimitsSection, LimitValues, NodeSection, PieceStoreSection

Usage = namedtuple("Usage", "total used free")
MiB = 1 << 20


def config(tmp_path: Path, *, min_free: int = 100 * MiB, receiver_memory: int = 0) -> Config:
    cfg = dataclasses.replace(Config(), node=NodeSection(data_dir=tmp_path),
                              piecestore=PieceStoreSection(min_free_bytes=min_free))
    if receiver_memory:
        cfg = dataclasses.replace(cfg, limits=LimitsSection(
            services={"receiver": LimitValues(memory=receiver_memory)}))
    return cfg


class FakeDisk:
    """shutil.disk_usage stand-in counting its calls (the real one cannot be steered)."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def __call__(self, path: object) -> Usage:
        self.calls += 1
        return Usage(10 * self.free, 9 * self.free, self.free)


def test_disk_probe_is_reused_within_its_interval(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    disk = FakeDisk(1 << 40)
    monkeypatch.setattr(shutil, "disk_usage", disk)
    now = [100.0]
    cap = ReceiveCapacity(config(tmp_path), build_limiter(config(tmp_path)),
                          disk_probe_interval=0.5, clock=lambda: now[0])
    for _ in range(5):
        assert cap.check(size=MiB, segment_size=16 * MiB, data_shards=4) == (True, "")
    assert disk.calls == 1
    disk.free = 50 * MiB  # below min_free once the next probe sees it
    now[0] += 0.4
    assert cap.check(size=MiB, segment_size=16 * MiB, data_shards=4)[0]
    now[0] += 0.2
    assert cap.check(size=MiB, segment_size=16 * MiB, data_shards=4) == (
        False, "insufficient free disk space")
    assert disk.calls == 2


def test_real_disk_and_limiter(tmp_path: Path) -> None:
    cfg = config(tmp_path, min_free=0, receiver_memory=MiB)
    limiter = build_limiter(cfg)
    cap = ReceiveCapacity(cfg, limiter)
    assert cap.free_disk() > 0
    assert cap.check(size=MiB, segment_size=16 * MiB, data_shards=4) == (True, "")
    ok, why = cap.check(size=64 * MiB, segment_size=16 * MiB, data_shards=4)  # 2 x 4 MiB
    assert not ok and "memory" in why
    assert limiter.used("receiver").is_zero()  # a check reserves nothing for good
    huge = ReceiveCapacity(config(tmp_path, min_free=1 << 62), limiter)
    assert huge.check(size=MiB, segment_size=16 * MiB, data_shards=4) == (
        False, "insufficient free disk space")
