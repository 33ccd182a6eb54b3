"""Writes racing other writes: a plain append rebases onto whatever landed first."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from app.services import Services
from app.write.append import Writer
from app.write.request import IngestRequest
from events.errors import TypeMismatch

pytestmark = pytest.mark.anyio


def body(tmp: Path, text: str, suffix: str) -> Path:
    path = tmp / f"{uuid.uuid4().hex}{suffix}"
    path.write_text(text)
    return path


class RacedWriter(Writer):
    """Lets another write land after this one has read the table and written its file,
    just before it appends: the interleaving that forces a rebase."""

    def __init__(self, services: Services, interloper: IngestRequest) -> None:
        super().__init__(services.log, services.reader, services.storage)
        self.other = Writer(services.log, services.reader, services.storage)
        self.interloper: IngestRequest | None = interloper

    async def register(self, org: str, super_: str, actor: str, request_id: str) -> None:
        await super().register(org, super_, actor, request_id)
        if self.interloper is not None:
            other, self.interloper = self.interloper, None
            await self.other.ingest(other)


async def test_csv_is_parsed_again_against_the_schema_that_won(
    services: Services, tmp_path: Path
) -> None:
    # The concurrent write creates "zip" as a string; ours would have inferred an int.
    interloper = IngestRequest(
        "o", "s", "t", body(tmp_path, json.dumps([{"zip": "99501"}]), ".json"), "json"
    )
    writer = RacedWriter(services, interloper)
    ours = IngestRequest("o", "s", "t", body(tmp_path, "zip\n02134\n", ".csv"), "csv")
    result = await writer.ingest(ours)
    assert result.version == 2
    state = await services.reader.super_state("o", "s")
    got = await services.engine.run(state, "select zip from t order by zip")
    assert got.table.column("zip").to_pylist() == ["02134", "99501"]
    files = [f.path for f in state.tables["t"].files]
    assert all([await services.storage.exists(p) for p in files])
    data_dir = services.settings.storage_root / "o" / "s" / "t" / "data"
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(Path(p).name for p in files)


async def test_a_rebase_that_cannot_fit_is_422_and_leaves_no_file(
    services: Services, tmp_path: Path
) -> None:
    interloper = IngestRequest(
        "o", "s", "t", body(tmp_path, json.dumps([{"v": "text"}]), ".json"), "json"
    )
    writer = RacedWriter(services, interloper)
    ours = IngestRequest("o", "s", "t", body(tmp_path, json.dumps([{"v": 1}]), ".json"), "json")
    with pytest.raises(TypeMismatch):
        await writer.ingest(ours)
    state = await services.reader.super_state("o", "s")
    assert state.tables["t"].version == 1  # only the interloper's write
    data_dir = services.settings.storage_root / "o" / "s" / "t" / "data"
    assert len(list(data_dir.iterdir())) == 1
