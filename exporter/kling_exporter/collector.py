"""Rendering metrics: ``Family`` rows (declared in ``accounting.metrics``, and in
``serving.metrics`` for the HTTP process's own) as Prometheus text or OpenMetrics.

A scrape is rendered while the reader waits between two chunks of lines, so the two
never compete for the interpreter and a render waits for one chunk at most. From the
rows come both prometheus_client metric families (for OpenMetrics and anything else the
library serves) and, for the common Prometheus text format, a direct renderer that keeps
each family's lines in blocks from scrape to scrape and makes again only what changed
(``blocks`` carries them between processes). Tests hold the two to the same bytes.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, NamedTuple, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Key = tuple[str, ...]


def keyed(table: Mapping[Any, float]) -> dict[Key, float]:
    """A table's samples keyed by label tuples (a single label's key as a 1-tuple)."""
    return {k if isinstance(k, tuple) else (k,): v for k, v in table.items()}


_fmt = cast(Callable[[float], str], floatToGoString)  # the library's own number format


class Family(NamedTuple):
    """One metric: ``samples`` maps label values (in ``labels`` order) to a value, or for
    a histogram to (cumulative buckets, sum)."""

    name: str  # counters without the _total suffix
    type: str  # counter | gauge | histogram
    doc: str
    labels: tuple[str, ...]
    samples: Mapping[Any, Any]  # keyed by tuples of label values
    unit: str = ""  # shown in OpenMetrics only
    # The keys whose samples may differ from the last render of the same ``samples``
    # dict (None: any may): ``TextRenderer`` re-reads those alone.
    changed: Collection[Key] | None = None


def to_metric(f: Family) -> Metric:
    """The prometheus_client family of a Family row."""
    labels = list(f.labels)
    if f.type == "histogram":
        hist = HistogramMetricFamily(f.name, f.doc, labels=labels, unit=f.unit)
        for key in sorted(f.samples):
            buckets, total = f.samples[key]
            hist.add_metric(list(key), buckets, total)
        return hist
    family: Metric
    if not labels and () in f.samples:
        value = f.samples[()]
        if f.type == "counter":
            return CounterMetricFamily(f.name, f.doc, value=value)
        return GaugeMetricFamily(f.name, f.doc, value=value)
    if f.type == "counter":
        family = CounterMetricFamily(f.name, f.doc, labels=labels)
    else:
        family = GaugeMetricFamily(f.name, f.doc, labels=labels)
    for key in sorted(f.samples):
        family.add_metric(list(key), f.samples[key])
    return family


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_text(names: tuple[str, ...], key: Key) -> str:
    pairs = sorted(zip(names, key, strict=True))
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in pairs) + "}"


# Series a block of a large family holds: a scrape sends, and compresses, again only the
# blocks whose series changed since the last one (about 36 KiB of text a block).
BLOCK_SERIES = 512


class Part(NamedTuple):
    """A block of the exposition as the renderer keeps it: ``version`` is the render at
    which its text last changed (``TextRenderer.renders``)."""

    key: str
    version: int
    text: bytes


class _Kept:
    """What a renderer keeps of one family between scrapes."""

    __slots__ = ("copy", "head", "order", "parts", "samples", "values", "zeros")

    def __init__(self, head: tuple[Any, ...]) -> None:
        self.head = head  # name, type, doc, labels: a change of any renders all again
        self.samples: Mapping[Any, Any] | None = None  # the dict last read, for ``changed``
        self.copy: dict[Any, Any] | None = None  # its samples then (small families)
        self.zeros: dict[Any, bool] = {}  # which of those were zero, and negative
        # A large family's keys in exposition order and each one's value; its lines are
        # those of its blocks' text, nothing more is kept of them (a series' place is
        # found by bisection: a dict of places cost 80 bytes a series).
        self.order: list[Key] = []
        self.values: list[Any] = []
        self.parts: list[Part] = []


def _negative(value: float) -> bool:
    return math.copysign(1.0, value) < 0


def _zeros(samples: Mapping[Any, Any]) -> dict[Any, bool]:
    """The keys of zero values, each with whether it is -0.0 (equal to 0.0, printed
    otherwise)."""
    return {
        key: math.copysign(1.0, value) < 0
        for key, value in samples.items()
        if isinstance(value, int | float) and not value
    }


def _keep(kept: _Kept, samples: Mapping[Any, Any]) -> None:
    kept.copy, kept.zeros = dict(samples), _zeros(samples)


def _same(kept: _Kept, samples: Mapping[Any, Any]) -> bool:
    """Whether ``samples`` would print as the copy kept of the last ones."""
    if kept.copy != samples:
        return False
    return all((math.copysign(1.0, samples[key]) < 0) == neg for key, neg in kept.zeros.items())


class TextRenderer:
    """Prometheus text format (0.0.4) straight from Family rows, in blocks kept from one
    scrape to the next (a small family is a block; a large one is cut every ``block``
    series). A series' line lives in its block's text alone, its label text made once
    and taken from there again; a value that changed has its line remade in the block.
    A family that says which of its samples ``changed`` since the last render has those
    lines alone read again; the others are compared sample by sample. ``parts`` gives
    the blocks with the render at which each last changed, so that only new text need
    be sent on or compressed again."""

    def __init__(self, block: int = BLOCK_SERIES) -> None:
        self.block = block  # series a block holds
        self._labels: dict[tuple[tuple[str, ...], Key], str] = {}
        self._kept: dict[str, _Kept] = {}
        self._values: dict[Any, str] = {}
        # Tells this renderer's versions from another's (a reader started again).
        self.epoch = random.getrandbits(62) + 1
        self.renders = 0

    def reset(self) -> None:
        """Forget every kept block: the next render makes all of them again."""
        self._kept.clear()

    def _labelstr(self, names: tuple[str, ...], key: Key) -> str:
        cache_key = (names, key)
        found = self._labels.get(cache_key)
        if found is None:
            found = _label_text(names, key)
            if len(self._labels) > 200_000:  # label churn beyond any sane limit
                self._labels.clear()
            self._labels[cache_key] = found
        return found

    def _fmt(self, value: float) -> str:
        """The library's number format, kept per value (counts repeat across series)."""
        if not value:  # 0.0 and -0.0 are equal and print differently
            return _fmt(value)
        found = self._values.get(value)
        if found is None:
            if len(self._values) > 100_000:
                self._values.clear()
            found = self._values[value] = _fmt(value)
        return found

    def render(self, fams: list[Family]) -> str:
        return b"".join(part.text for part in self.parts(fams)).decode()

    def parts(self, fams: list[Family]) -> list[Part]:
        """The blocks of these families, in exposition order."""
        self.renders += 1
        out: list[Part] = []
        try:
            for f in fams:
                kept = self._kept.get(f.name)
                if kept is None or kept.head != f[:4]:
                    kept = self._kept[f.name] = _Kept(f[:4])
                if f.type == "histogram" or not f.labels:
                    self._whole(f, kept)
                else:
                    self._series(f, kept)
                out += kept.parts
        except BaseException:
            self._kept.clear()  # half brought up to date: start again at the next render
            raise
        return out

    def _header(self, f: Family) -> tuple[str, str]:
        name = f.name + "_total" if f.type == "counter" else f.name
        doc = f.doc.replace("\\", r"\\").replace("\n", r"\n")
        return name, f"# HELP {name} {doc}\n# TYPE {name} {f.type}\n"

    def _whole(self, f: Family, kept: _Kept) -> None:
        """A family of one block: made again whenever its samples differ."""
        if kept.parts and _same(kept, f.samples):
            return
        name, head = self._header(f)
        out = [head]
        append, labelstr, fmt = out.append, self._labelstr, self._fmt
        samples = f.samples
        if f.type == "histogram":
            for key in sorted(samples):
                buckets, total = samples[key]
                count = 0.0
                for le, value in buckets:
                    labels = labelstr((*f.labels, "le"), (*key, le))
                    append(f"{name}_bucket{labels} {fmt(value)}\n")
                    count = value
                labels = labelstr(f.labels, key)
                append(f"{name}_count{labels} {fmt(count)}\n")
                append(f"{name}_sum{labels} {fmt(total)}\n")
        elif () in samples:
            append(f"{name} {fmt(samples[()])}\n")
        _keep(kept, samples)
        self._set(kept, f.name, ["".join(out).encode()])

    def _series(self, f: Family, kept: _Kept) -> None:
        """A family of labelled series, a block every ``self.block`` of them."""
        samples, block = f.samples, self.block
        keys: Collection[Key] | None = None  # None: every series may have changed
        if f.changed is not None and samples is kept.samples and kept.parts:
            keys = f.changed  # only these can differ from the last render
        elif f.changed is None and kept.parts and _same(kept, samples):
            return
        kept.samples = samples
        if f.changed is None:
            _keep(kept, samples)
        else:
            kept.copy = None
        name, head = self._header(f)
        dirty = self._reread(samples, keys, kept) if kept.parts else None
        if dirty is None or len(kept.order) != len(samples):
            lines = self._reorder(name, f.labels, samples, kept)
            texts = [b"".join(lines[i : i + block]) for i in range(0, max(1, len(lines)), block)]
            texts[0] = head.encode() + texts[0]
        else:
            texts = [part.text for part in kept.parts]
            for i, places in dirty.items():
                texts[i] = self._remade(texts[i], i, places, kept.values)
        self._set(kept, f.name, texts)

    def _reread(
        self, samples: Mapping[Any, Any], keys: Collection[Key] | None, kept: _Kept
    ) -> dict[int, list[int]] | None:
        """The places of ``keys`` (None: of every series) whose value changed, by block,
        their new values kept; None when a series came or went (the order is then made
        again)."""
        order, values, block = kept.order, kept.values, self.block
        places: Collection[int]
        if keys is None:
            if len(order) != len(samples):
                return None
            places = range(len(order))
        else:
            places, end = [], len(order)
            for key in keys:
                at = bisect_left(order, key)
                kept_here = at < end and order[at] == key
                if kept_here != (key in samples):  # a series come, or gone
                    return None
                if kept_here:
                    places.append(at)
        dirty: dict[int, list[int]] = {}
        for at in places:
            value = samples.get(order[at])
            if value is None:  # a series gone (and another come)
                return None
            was = values[at]
            # 0.0 and -0.0 are equal and print differently.
            if was != value or (not value and _negative(was) != _negative(value)):
                values[at] = value
                dirty.setdefault(at // block, []).append(at)
        return dirty

    def _remade(self, text: bytes, i: int, places: list[int], values: list[Any]) -> bytes:
        """Block ``i``'s text with the lines at ``places`` given their new value."""
        lines = text.split(b"\n")  # escaped in labels and help: a line is a line
        shift = (2 if i == 0 else 0) - i * self.block  # the first block's HELP and TYPE
        fmt = self._fmt
        for at in places:
            line = lines[at + shift]
            # The value is the line's last field and holds no space.
            lines[at + shift] = line[: line.rindex(b" ") + 1] + fmt(values[at]).encode()
        return b"\n".join(lines)

    def _reorder(
        self, name: str, names: tuple[str, ...], samples: Mapping[Any, Any], kept: _Kept
    ) -> list[bytes]:
        """Every line in exposition order again, for a family whose series changed; the
        label text of a series kept is taken from its line."""
        was, old = kept.order, []
        for i, part in enumerate(kept.parts if was else ()):
            lines = part.text.split(b"\n")
            old += lines[2:-1] if i == 0 else lines[:-1]
        order = kept.order = sorted(samples)
        values = kept.values = [samples[key] for key in order]
        made, fmt, j, end = [], self._fmt, 0, len(was)
        for key, value in zip(order, values, strict=True):
            while j < end and was[j] < key:  # both are sorted: one walk finds each
                j += 1
            if j < end and was[j] == key:
                line = old[j]
                head = line[: line.rindex(b" ") + 1]
            else:
                head = f"{name}{_label_text(names, key)} ".encode()
            made.append(head + fmt(value).encode() + b"\n")
        return made

    def _set(self, kept: _Kept, name: str, texts: list[bytes]) -> None:
        """The family's blocks, each with a new version where its text changed."""
        old = kept.parts
        kept.parts = [
            old[i]
            if i < len(old) and old[i].text == text
            else Part(f"{name}/{i}", self.renders, text)
            for i, text in enumerate(texts)
        ]


class FamilyCollector(Collector):
    """Family rows as a prometheus_client collector. ``declared`` says which families
    there are without reading them (a registry asks at registration, and a scrape with
    ``name[]`` filters finds its collectors by those names)."""

    def __init__(
        self, rows: Callable[[], list[Family]], declared: Callable[[], list[Family]] = list
    ) -> None:
        self.rows = rows
        self.declared = declared

    def describe(self) -> list[Metric]:
        return [to_metric(f._replace(samples={})) for f in self.declared()]

    def families(self) -> list[Family]:
        return self.rows()

    def collect(self) -> Iterator[Metric]:
        for f in self.families():
            yield to_metric(f)


def plain_text(accept: str, names: list[str] | None) -> bool:
    """Whether a scrape with this Accept header and these ``name[]`` filters gets the
    plain text format of every family (rendered in blocks), or else an encoder's."""
    return "application/openmetrics-text" not in accept and not names


class Exposition:
    """What a scrape receives: the plain Prometheus text from our renderer, which keeps
    its blocks across scrapes; OpenMetrics and ``name[]`` filters from
    prometheus_client's encoders over the same families; process metrics beside ours."""

    def __init__(
        self,
        rows: Callable[[], list[Family]],
        declared: Callable[[], list[Family]],
        process: bool = True,
        text_rows: Callable[[], list[Family]] | None = None,
    ) -> None:
        self.kling = FamilyCollector(rows, declared)
        self.text_rows = text_rows or rows  # the families for the text renderer
        self.process = CollectorRegistry(auto_describe=False)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.kling)
        if process:
            ProcessCollector(registry=self.process)
            self.registry.register(ProcessCollector(registry=None))
        self._with_process = process
        self.text = TextRenderer()
        self._process_part = Part("process", 0, b"")

    def parts(self) -> list[Part]:
        """The blocks of the plain text format, the process metrics last."""
        parts = self.text.parts(self.text_rows())
        if self._with_process:
            text = generate_latest(self.process)
            if text != self._process_part.text:
                self._process_part = Part("process", self.text.renders, text)
            parts.append(self._process_part)
        return parts

    def render(self, accept: str = "", names: list[str] | None = None) -> tuple[bytes, str]:
        """The body and its content type for a scrape with this Accept header and these
        ``name[]`` filters."""
        if not plain_text(accept, names):
            encoder, content_type = choose_encoder(accept)
            registry = self.registry.restricted_registry(names) if names else self.registry
            return encoder(registry), content_type
        return b"".join(part.text for part in self.parts()), CONTENT_TYPE_LATEST

    def splice(self, body: bytes, accept: str = "", names: list[str] | None = None) -> bytes:
        """``body`` (rendered elsewhere in the same format) with these families added."""
        ours, _ = self.render(accept, names)
        eof = b"# EOF\n"
        if body.endswith(eof) and ours.endswith(eof):
            return body[: -len(eof)] + ours
        return body + ours
