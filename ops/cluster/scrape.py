"""Scrape a node's Prometheus metrics as a monitoring system would.

An HTTP GET of ``/metrics`` (urllib), parsed with prometheus_client's own text
parser, so a test checks what a Prometheus server would store: every sample by
its full name (``chat_batches_total``, ``chat_fsync_seconds_count``) and labels.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class Scrape:
    samples: tuple[Sample, ...]

    @property
    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the sample ``name`` with these labels (and maybe others)."""
        for sample in self.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
        return None

    def value(self, name: str, **labels: str) -> float:
        """Like ``get``, but the sample must be there."""
        found = self.get(name, **labels)
        if found is None:
            raise AssertionError(f"no sample {name}{labels or ''} in the scrape")
        return found

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """Every sample ``name``, by the value of ``label``."""
        return {
            sample.labels[label]: float(sample.value)
            for sample in self.samples
            if sample.name == name and label in sample.labels
        }

    def over(self, histogram: str, bound: float) -> float:
        """How many observations of ``histogram`` were above ``bound``, one of its
        bucket bounds: the count less that bucket's."""
        buckets = {float(le): n for le, n in self.by_label(f"{histogram}_bucket", "le").items()}
        if bound not in buckets:
            raise AssertionError(f"{histogram} has no bucket {bound}: {sorted(buckets)}")
        return self.value(f"{histogram}_count") - buckets[bound]


def scrape(address: str, timeout: float = 2.0) -> Scrape | None:
    """The metrics at ``http://address/metrics``; None if nothing answers there."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return Scrape(tuple(samples))
