"""Rendering metrics: ``Family`` rows (declared in ``accounting.metrics``, and in
``serving.metrics`` for the HTTP process's own) as Prometheus text or OpenMetrics.

A scrape is rendered while the reader waits between two chunks of lines, so the two
never compete for the interpreter and a render waits for one chunk at most. From the
rows come both prometheus_client metric families (for OpenMetrics and anything else the
library serves) and, for the common Prometheus text format, a direct renderer that
reuses each series' label string from scrape to scrape. A test holds the two to the
same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
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


class TextRenderer:
    """Prometheus text format (0.0.4) straight from Family rows. Label strings are made
    once per series and kept, since series outlive scrapes; so is the text of each
    family, used again while its samples are equal to the last scrape's (comparing two
    dicts costs a small part of rendering them)."""

    def __init__(self) -> None:
        self._labels: dict[tuple[tuple[str, ...], Key], str] = {}
        self._texts: dict[str, tuple[Family, dict[Any, Any], str]] = {}
        self._lines: dict[str, tuple[Any, dict[Key, tuple[float, str]], list[Key]]] = {}

    def _labelstr(self, names: tuple[str, ...], key: Key) -> str:
        cache_key = (names, key)
        found = self._labels.get(cache_key)
        if found is None:
            pairs = sorted(zip(names, key, strict=True))
            found = "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in pairs) + "}"
            if len(self._labels) > 200_000:  # label churn beyond any sane limit
                self._labels.clear()
            self._labels[cache_key] = found
        return found

    def render(self, fams: list[Family]) -> str:
        texts = self._texts
        out = []
        for f in fams:
            kept = texts.get(f.name)
            if kept is not None and kept[0][:4] == f[:4] and kept[1] == f.samples:
                out.append(kept[2])
                continue
            text = self._render([f])
            texts[f.name] = (f, dict(f.samples), text)
            out.append(text)
        return "".join(out)

    def _render(self, fams: list[Family]) -> str:
        out: list[str] = []
        append, labelstr, fmt = out.append, self._labelstr, _fmt
        for f in fams:
            name = f.name + "_total" if f.type == "counter" else f.name
            doc = f.doc.replace("\\", r"\\").replace("\n", r"\n")
            append(f"# HELP {name} {doc}\n# TYPE {name} {f.type}\n")
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
            elif not f.labels:
                append(f"{name} {fmt(samples[()])}\n")
            else:
                self._series(name, f.labels, samples, append)
        return "".join(out)

    def _series(
        self, name: str, names: tuple[str, ...], samples: Mapping[Any, Any], append: Any
    ) -> None:
        """The lines of one family, each kept with its value: while a backlog is read most
        series of a family keep their value from one scrape to the next, so most lines
        are used again rather than formatted; the order of the keys is kept too."""
        kept = self._lines.get(name)
        if kept is None or len(kept[1]) > 2 * len(samples) + 1000:
            kept = self._lines[name] = ({}.keys(), {}, [])
        keys, lines, order = kept
        if samples.keys() != keys:
            order = sorted(samples)
            self._lines[name] = (dict.fromkeys(samples).keys(), lines, order)
        labelstr, fmt = self._labelstr, _fmt
        for key in order:
            value = samples[key]
            line = lines.get(key)
            if line is None or line[0] != value or not value:  # 0.0 and -0.0 are equal
                line = lines[key] = (value, f"{name}{labelstr(names, key)} {fmt(value)}\n")
            append(line[1])


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


class Exposition:
    """What a scrape receives: the plain Prometheus text from our renderer, which reuses
    label strings across scrapes; OpenMetrics and ``name[]`` filters from
    prometheus_client's encoders over the same families; process metrics beside ours."""

    def __init__(
        self,
        rows: Callable[[], list[Family]],
        declared: Callable[[], list[Family]],
        process: bool = True,
    ) -> None:
        self.kling = FamilyCollector(rows, declared)
        self.process = CollectorRegistry(auto_describe=False)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.kling)
        if process:
            ProcessCollector(registry=self.process)
            self.registry.register(ProcessCollector(registry=None))
        self.text = TextRenderer()

    def render(self, accept: str = "", names: list[str] | None = None) -> tuple[bytes, str]:
        """The body and its content type for a scrape with this Accept header and these
        ``name[]`` filters."""
        if "application/openmetrics-text" in accept or names:
            encoder, content_type = choose_encoder(accept)
            registry = self.registry.restricted_registry(names) if names else self.registry
            return encoder(registry), content_type
        text = self.text.render(self.kling.families()) + generate_latest(self.process).decode()
        return text.encode(), CONTENT_TYPE_LATEST

    def splice(self, body: bytes, accept: str = "", names: list[str] | None = None) -> bytes:
        """``body`` (rendered elsewhere in the same format) with these families added."""
        ours, _ = self.render(accept, names)
        eof = b"# EOF\n"
        if body.endswith(eof) and ours.endswith(eof):
            return body[: -len(eof)] + ours
        return body + ours
