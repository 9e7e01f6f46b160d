"""Input shards shaped like real ones: img2dataset webdataset output with ``.json`` sidecars, and
Hugging Face Parquet shards with extra columns (ImageNet-style, ClassLabel names in the metadata)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import filesystem
from pipeline.synthetic import render

INVALID_JSON = "{not json"
NO_SIDECAR = None


def _jpeg(label: int, seed: int) -> bytes:
    buf = io.BytesIO()
    render(label, (48, 40), np.random.default_rng(seed)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def laion_sidecar(shard: int, i: int) -> dict:
    """What img2dataset writes for a downloaded sample (plus the LAION metadata columns)."""
    key = f"{shard:04d}{i:05d}"
    return {
        "url": f"https://images.example.com/{shard}/{i}.jpg",
        "caption": f"photo {key} of a thing",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 48,
        "height": 40,
        "original_width": 480 + i,
        "original_height": 400,
        "exif": {"Image Make": "Canon", "EXIF ExposureTime": f"1/{60 + i}"},
        "sha256": f"{shard * 1000 + i:064x}",
        "similarity": round(0.25 + 0.01 * i, 4),
        "AESTHETIC_SCORE": 5.0 + 0.5 * i,
    }


def laion_shards() -> list[list[tuple[str, dict | str | None]]]:
    """Two shards of (key, sidecar) with the oddities of real metadata.

    Shard 0 (where types are inferred): AESTHETIC_SCORE mixes int and float; one sample lacks
    AESTHETIC_SCORE and exif; exif is an object (sometimes empty). Shard 1: a string similarity
    and a string original_width (wrong types), an invalid sidecar, a sample without one, an int
    AESTHETIC_SCORE (fits float64) and a nested exif.
    """
    shards = []
    for s in range(2):
        samples = [laion_sidecar(s, i) for i in range(6)]
        shards.append([[m["key"], m] for m in samples])
    first = shards[0]
    first[0][1]["AESTHETIC_SCORE"] = 5
    first[1][1]["exif"] = {}
    del first[2][1]["AESTHETIC_SCORE"], first[2][1]["exif"]
    later = shards[1]
    later[0][1]["similarity"] = "n/a"
    later[1][1]["original_width"] = "1024"
    later[2][1] = INVALID_JSON
    later[3][1] = NO_SIDECAR
    later[4][1]["AESTHETIC_SCORE"] = 7
    later[5][1]["exif"] = {"GPS": [1, 2], "Image Make": "Nikon"}
    return [[tuple(x) for x in shard] for shard in shards]


def write_laion(url: str, shards=None, storage_options: dict | None = None) -> dict[str, dict | str | None]:
    """img2dataset layout under ``url``: ``{shard:05d}.tar`` with ``.jpg .txt .json`` per sample.
    Returns key -> sidecar as written (dict, raw text, or None when there is none)."""
    shards = laion_shards() if shards is None else shards
    fs, root = filesystem(url, storage_options)
    fs.makedirs(root, exist_ok=True)
    written = {}
    for s, samples in enumerate(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, (key, sidecar) in enumerate(samples):
                members = {"jpg": _jpeg(i % 4, s * 100 + i), "txt": f"photo {key}".encode()}
                if sidecar is not None:
                    members["json"] = (sidecar if isinstance(sidecar, str) else json.dumps(sidecar)).encode()
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                written[key] = sidecar
        fs.pipe_file(f"{root.rstrip('/')}/{s:05d}.tar", buf.getvalue())
    return written


COARSE_NAMES = ["animal", "object"]


def write_imagenet_parquet(url: str, num_shards: int = 2, rows: int = 4, drift: bool = True) -> dict[str, dict]:
    """HF-style Parquet shards: ``image`` struct, ``label`` ClassLabel, and extra columns
    ``synset`` (string), ``coarse`` (ClassLabel), ``bbox`` (list<float32>), ``score`` (float32, no
    feature in the metadata) and ``blob`` (large binary nobody keeps). With ``drift`` the last
    shard has no ``synset`` column and a string ``score``. Returns key -> extra values."""
    fs, root = filesystem(url)
    fs.makedirs(root, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rng = np.random.default_rng(0)
    expected = {}
    for s in range(num_shards):
        keys = [f"n{s:02d}_{i:04d}.JPEG" for i in range(rows)]
        last = drift and s == num_shards - 1
        columns = {
            "image": pa.array([{"bytes": _jpeg(i % 3, s * 10 + i), "path": k} for i, k in enumerate(keys)], image_type),
            "label": pa.array([i % 3 for i in range(rows)], pa.int64()),
            "coarse": pa.array([i % 2 for i in range(rows)], pa.int64()),
            "bbox": pa.array([[0.1 * i, 0.2, 0.5, 0.75] for i in range(rows)], pa.list_(pa.float32())),
            "score": pa.array([f"{i}" for i in range(rows)]) if last else pa.array([0.5 * i for i in range(rows)], pa.float32()),
            "blob": pa.array([rng.bytes(64 << 10) for _ in range(rows)], pa.binary()),
        }
        if not last:
            columns["synset"] = pa.array([f"n0{i:07d}" for i in range(rows)])
        features = {
            "image": {"_type": "Image"},
            "label": {"names": ["tench", "goldfish", "shark"], "_type": "ClassLabel"},
            "coarse": {"names": COARSE_NAMES, "_type": "ClassLabel"},
            "bbox": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "List"},
        }
        table = pa.table(columns).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        with fs.open(f"{root}/train-{s:05d}-of-{num_shards:05d}.parquet", "wb") as f:
            pq.write_table(table, f, row_group_size=2)
        for i, k in enumerate(keys):
            expected[k] = {
                "synset": None if last else f"n0{i:07d}",
                "coarse": i % 2,
                "bbox": [np.float32(v).item() for v in (0.1 * i, 0.2, 0.5, 0.75)],
                "score": None if last else 0.5 * i,
            }
    return expected
