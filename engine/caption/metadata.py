"""The editable captions file: ``metadata.jsonl`` in Hugging Face imagefolder form.

Why this form: it is what people already edit and what ``datasets``' imagefolder (and so
``dataset.name`` pointing at the folder) reads back: one line per image,
``{"file_name": "images/000000.png", "text": "a caption"}`` (``text`` a list when an image
has several captions). The caption step writes it beside the images of the captioned
prepared dataset, outside that dataset's manifest (an edit there changes nothing that
was trained); :func:`export_imagefolder` copies images and file to a folder of the user's,
which is a dataset a task can name as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from engine.data.layout import open_dataset
from engine.store import storage

METADATA_NAME = "metadata.jsonl"


def metadata_lines(records: Iterable[dict]) -> bytes:
    """The ``metadata.jsonl`` of prepared records (their ``file`` and ``captions``)."""
    lines = []
    for record in records:
        captions = list(record["captions"])
        text: str | list[str] = captions[0] if len(captions) == 1 else captions
        lines.append(json.dumps({"file_name": record["file"], "text": text},
                                ensure_ascii=False))
    return "".join(line + "\n" for line in lines).encode("utf-8")


def write_metadata(address: str, *, replace: bool) -> str:
    """Write the ``metadata.jsonl`` of the prepared dataset at ``address`` beside its
    images; an existing one (perhaps edited) is kept unless ``replace``. Its URL."""
    url = storage.join(address, METADATA_NAME)
    if replace or not storage.exists(url):
        dataset = open_dataset(address)
        storage.write_bytes(url, metadata_lines(dataset.record(i) for i in range(len(dataset))))
    return url


def export_imagefolder(address: str, dest: str) -> str:
    """Copy the images of the prepared dataset at ``address`` and its captions, as
    ``metadata.jsonl``, into ``dest``: an image folder to review, edit and train from
    (``dataset.name``). Files already there of the same names are replaced. Its URL."""
    dataset = open_dataset(address)
    records = [dataset.record(i) for i in range(len(dataset))]
    for i, record in enumerate(records):
        storage.write_bytes(storage.join(dest, record["file"]), dataset.image_bytes(i))
    url = storage.join(dest, METADATA_NAME)
    storage.write_bytes(url, metadata_lines(records))
    return url
