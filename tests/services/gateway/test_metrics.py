"""The Prometheus exposition: what a scraper parses."""

from __future__ import annotations

import pytest

from specrelay.services.gateway.metrics import Counter, GatewayMetrics, Histogram, KvStats


def test_histogram_buckets_are_cumulative_with_sum_and_count():
    h = Histogram("lat_seconds", "latency", buckets=(0.1, 1.0))
    for value in (0.05, 0.5, 0.5, 3.0):
        h.observe(value)
    lines = h.render()
    assert lines[:2] == ["# HELP lat_seconds latency", "# TYPE lat_seconds histogram"]
    assert lines[2:] == ['lat_seconds_bucket{le="0.1"} 1', 'lat_seconds_bucket{le="1"} 3',
                         'lat_seconds_bucket{le="+Inf"} 4', "lat_seconds_sum 4.05", "lat_seconds_count 4"]


def test_labels_are_escaped_and_counters_only_go_up():
    c = Counter("req_total", "requests", ("path",))
    c.inc(path='/a"b\\c\nd')
    assert c.render()[-1] == 'req_total{path="/a\\"b\\\\c\\nd"} 1'
    with pytest.raises(ValueError):
        c.inc(-1, path="/")
    with pytest.raises(ValueError):
        c.inc(path="/", other="x")


def test_gateway_metrics_derive_rates_and_read_kv_stats_at_scrape():
    used = [3]
    m = GatewayMetrics(kv_stats=lambda: KvStats(blocks_used=used[0], blocks_total=64))
    m.drafted.inc(10)
    m.accepted.inc(7)
    m.prompt_tokens.inc(200)
    m.cached_tokens.inc(50)
    text = m.render()
    assert "specrelay_spec_acceptance_rate 0.7\n" in text
    assert "specrelay_kv_reuse_rate 0.25\n" in text
    assert "specrelay_kv_blocks_used 3\n" in text and "specrelay_kv_blocks_total 64\n" in text
    used[0] = 0
    assert "specrelay_kv_blocks_used 0\n" in m.render()
    assert "specrelay_kv_blocks_used" not in GatewayMetrics().render()  # no verifier here: no made-up gauge
