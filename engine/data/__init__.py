"""Datasets: where rows come from, which images count, and the prepared form training reads.

* :mod:`~engine.data.dataset`: :func:`prepare_dataset`, source to committed dataset.
* :mod:`~engine.data.sources`: loading a source (image folder, tabular files, archive,
  Hub) and the bytes behind one row's image.
* :mod:`~engine.data.archive_fetch`, :mod:`~engine.data.archive_members`,
  :mod:`~engine.data.archive_extract`: an untrusted archive downloaded, checked, unpacked.
* :mod:`~engine.data.images`: the image policy (decode, verify, why one is skipped).
* :mod:`~engine.data.captions`: the columns and captions of a source, checked.
* :mod:`~engine.data.identity`: a source's credential-free record and its address.
* :mod:`~engine.data.layout`: the prepared dataset on storage (commit, verify, read).
* :mod:`~engine.data.prepared`: a task's dataset, prepared or found, for a segment.
* :mod:`~engine.data.transforms`: deterministic crops and pixels for training.
* :mod:`~engine.data.errors`: ``DatasetError``, ``ArchiveError``, ``FetchError``.
"""
