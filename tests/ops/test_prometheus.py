"""The alert rules (``contrib/prometheus``) and the dashboard (``contrib/grafana``)
against the daemon's real ``/metrics``.

``promtool`` comes from Debian's ``prometheus`` package (``.ci/apt-packages``); the tests
FAIL when it is missing. One real daemon (module fixture) runs real jobs: a backup of
``app`` (SQLite) that succeeds after a killed job's debris was left in its destination,
a verification of that backup after one of its streams was damaged (fails), a backup of
``broken`` (a command that exits 3: fails) and a slow backup of ``slow`` that is
scraped while it runs and then aborted. ``GET /metrics`` is scraped before the jobs
(S0), while ``slow`` runs (S1) and at the end (S2).

The scrapes become ``promtool test rules``' input series (``_input_series``): S0 at
minute 0, S1 at minute 10 (held, as a daemon that is stuck keeps reporting the same
job), S2 from minute 40 on; promtool's clock starts at the Unix epoch, so every
timestamp in a scrape is moved by the scrape's own time (the scrape's moment is its
minute in promtool's time). Each alert gets a case where it fires and one where it does
not; the expected labels are the real ones (database names, job ids) and the expected
annotations are the rules' templates filled with them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML comes with moto[server]
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.conftest import REPO, Daemon, make_sqlite
from tests.ops.conftest import request, submit, wait_job

RULES = REPO / "contrib" / "prometheus" / "vdistream-rules.yml"
SCRAPE_CONFIG = REPO / "contrib" / "prometheus" / "scrape-config.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "vdistream-dashboard.json"
ENV_PROBE = Path(__file__).with_name("env_probe.py")
#: the labels Prometheus adds to every scraped series
TARGET = {"instance": "db1:9187", "job": "vdistream"}
#: a suffix of these names marks a value that is a Unix time (moved, module doc)
_TIMESTAMPS = ("_timestamp_seconds", "_start_time_seconds", "_created")


def _promtool() -> str:
    found = shutil.which("promtool")
    assert found is not None, (
        "promtool is missing: install Debian's package prometheus (.ci/apt-packages lists "
        "it); these tests do not skip"
    )
    return found


@dataclass(frozen=True)
class Scrape:
    at: float  # Unix time of the scrape
    text: str

    def names(self) -> set[str]:
        """Every series name the scrape declares (``# TYPE``), with or without
        samples yet (a labelled counter before its first increment)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        out: set[str] = set()
        for family in text_string_to_metric_families(self.text):
            out.add(family.name)
            out.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
            out.update(sample.name for sample in family.samples)
        return out

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(self.text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out


@dataclass(frozen=True)
class Run:
    """What the module's daemon did: its scrapes and the ids of its jobs."""

    scrapes: tuple[Scrape, Scrape, Scrape]
    slow_job: str
    names: frozenset[str]  # every sample name of the scrapes


def _scrape(daemon: Daemon) -> Scrape:
    at = time.time()
    status, body = daemon.get("/metrics")
    assert status == 200
    return Scrape(at, body.decode())


def _die_holding_a_backup(dest: Path, backup_id: str) -> None:
    """A process that marks ``backup_id`` in ``dest`` in progress, writes a stream and
    dies without cleaning up (as ``kill -9`` leaves it): debris for the next sweep."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from vdistream.ownership import LOCK_NAME, OwnerLock\n"
        "directory = Path(sys.argv[1]) / sys.argv[2]\n"
        "directory.mkdir(parents=True)\n"
        "lock = OwnerLock.acquire(directory / LOCK_NAME)\n"
        "(directory / 'stream-00-of-01.vdi').write_bytes(os.urandom(1000))\n"
        "os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(dest), backup_id], check=False)
    assert done.returncode == 9


def _moved(scrape: Scrape) -> bool:
    """Whether every device of the running job has moved bytes."""
    moved = [v for (name, _), v in scrape.samples().items() if name == "vdistream_job_device_bytes"]
    return bool(moved) and all(v > 0 for v in moved)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("prometheus")
    source = make_sqlite(root / "app.db", rows=5_000)
    marker = root / "probe.txt"
    daemon = Daemon(
        root,
        {
            # daily at 03:00 UTC, hourly, none
            "app": {"url": f"sqlite://{source}", "schedule": "0 3 * * *"},
            "broken": {"url": "cmd:sh -c 'exit 3'", "schedule": "0 * * * *"},
            "slow": {"url": f"cmd:{sys.executable} {ENV_PROBE} {marker} 400000000 1000000"},
        },
    )
    daemon.start()
    try:
        s0 = _scrape(daemon)
        daemon.dest.mkdir(parents=True, exist_ok=True)
        _die_holding_a_backup(daemon.dest, "app.killed-1")
        backup = wait_job(daemon, submit(daemon, kind="backup", database="app"))
        assert backup["state"] == "succeeded", backup
        assert not (daemon.dest / "app.killed-1").exists()  # swept
        backup_id = backup["backup_id"]
        # its verification (verify_after_backup) ends first; then one of a damaged copy
        _, jobs = request(daemon, "GET", "/v1/jobs?kind=verify")
        for job in jobs["jobs"]:
            assert wait_job(daemon, job["id"])["state"] == "succeeded"
        stream = sorted((daemon.dest / backup_id).glob("stream-*"))[0]
        data = bytearray(stream.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stream.write_bytes(bytes(data))
        verify = wait_job(
            daemon, submit(daemon, kind="verify", database="app", backup_id=backup_id)
        )
        assert verify["state"] == "failed", verify
        broken = wait_job(daemon, submit(daemon, kind="backup", database="broken"))
        assert broken["state"] == "failed", broken
        slow = submit(daemon, kind="backup", database="slow")
        wait_job(daemon, slow, ("running",))
        deadline = time.monotonic() + 30
        while not _moved(s1 := _scrape(daemon)):
            assert time.monotonic() < deadline, "no per-device bytes of the running job"
            time.sleep(0.2)
        status, _ = request(daemon, "POST", f"/v1/jobs/{slow}/abort", {"reason": "test"})
        assert status == 202
        assert wait_job(daemon, slow)["state"] == "aborted"
        s2 = _scrape(daemon)
    finally:
        daemon.stop()
    names = frozenset(name for s in (s0, s1, s2) for name in s.names())
    return Run((s0, s1, s2), slow, names)


# --------------------------------------------------------------------------- rules


def test_promtool_check_rules() -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_promtool_check_config_of_the_example(tmp_path: Path) -> None:
    token = tmp_path / "vdistream-token"
    token.write_text("0123456789abcdef0123\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        SCRAPE_CONFIG.read_text().replace("/etc/prometheus/vdistream-token", str(token))
    )
    shutil.copy(RULES, tmp_path / RULES.name)
    done = subprocess.run(
        [_promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_metrics_the_rules_need_are_in_the_real_scrape(run: Run) -> None:
    s0, s1, s2 = (s.samples() for s in run.scrapes)

    def value(samples: dict[Any, float], name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    jobs = "vdistream_database_jobs_total"
    assert value(s0, jobs, database="broken", kind="backup", outcome="failed") == 0
    assert value(s2, jobs, database="broken", kind="backup", outcome="failed") == 1
    assert value(s2, jobs, database="app", kind="verify", outcome="failed") == 1
    assert value(s2, jobs, database="app", kind="verify", outcome="succeeded") == 1
    assert value(s2, jobs, database="slow", kind="backup", outcome="aborted") == 1
    assert value(s0, "vdistream_debris_removed_total", database="app") == 0
    assert value(s2, "vdistream_debris_removed_total", database="app") >= 1
    day, hour = 86400.0, 3600.0
    assert value(s2, "vdistream_schedule_interval_seconds", database="app", kind="full") == day
    assert value(s2, "vdistream_schedule_interval_seconds", database="broken", kind="full") == hour
    last = value(s2, "vdistream_last_success_timestamp_seconds", database="app", kind="full")
    assert run.scrapes[0].at - 1 < last <= run.scrapes[2].at
    assert not any(
        name == "vdistream_last_success_timestamp_seconds" and ("database", "broken") in labels
        for name, labels in s2
    )
    progress = [k for k in s1 if k[0] == "vdistream_job_last_progress_timestamp_seconds"]
    assert [dict(labels) for _, labels in progress] == [
        {"database": "slow", "job_id": run.slow_job, "kind": "backup"}
    ]
    for index in ("0", "1"):  # two devices
        device = {"database": "slow", "job_id": run.slow_job, "device": index}
        assert value(s1, "vdistream_job_device_bytes", **device) > 0
        assert value(s1, "vdistream_job_device_rate_bytes_per_second", **device) > 0
    gone = ("vdistream_job_last_progress", "vdistream_job_device_")
    assert not [k for k in s2 if k[0].startswith(gone)]  # gone with the job


def _selector(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    return repr(value)


def _input_series(timeline: list[tuple[int, Scrape]], minutes: int) -> list[dict[str, str]]:
    """The scrapes as promtool input series, one sample a minute (module doc)."""
    placed = [(at, scrape, scrape.samples()) for at, scrape in timeline]
    keys = sorted({key for _, _, samples in placed for key in samples})
    series = []
    for name, labels in keys:
        runs: list[list[Any]] = []  # [value text, count]
        for minute in range(minutes + 1):
            at, scrape, samples = next(p for p in reversed(placed) if p[0] <= minute)
            value = samples.get((name, labels))
            if value is None:
                text = "_"
            else:
                if name.endswith(_TIMESTAMPS):
                    value = value - scrape.at + at * 60
                text = _number(value)
            if runs and runs[-1][0] == text:
                runs[-1][1] += 1
            else:
                runs.append([text, 1])
        values = " ".join(
            f"_x{count}" if text == "_" else f"{text}+0x{count - 1}" for text, count in runs
        )
        series.append({"series": _selector(name, {**dict(labels), **TARGET}), "values": values})
    return series


def _alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def _expected(alertname: str, **labels: str) -> dict[str, Any]:
    """The alert as promtool reports it: the series' labels, the rule's labels, and its
    annotations with the labels filled in (the rules use nothing else)."""
    rule = _alerts()[alertname]
    every = {**TARGET, **labels}

    def fill(text: str) -> str:
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: every[m[1]], text)

    return {
        "exp_labels": {**every, **rule["labels"]},
        "exp_annotations": {k: fill(v) for k, v in rule["annotations"].items()},
    }


def _case(at: str, alertname: str, *alerts: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alertname, "exp_alerts": list(alerts)}


def test_promtool_test_rules_on_the_real_scrapes(run: Run, tmp_path: Path) -> None:
    s0, s1, s2 = run.scrapes
    minutes = 41 * 60
    series = _input_series([(0, s0), (10, s1), (40, s2)], minutes)
    full = {"kind": "full"}
    slow = {"database": "slow", "job_id": run.slow_job, "kind": "backup"}
    cases = [
        # before any job: nothing fires
        *(_case("5m", name) for name in _alerts()),
        # after the jobs: each of these fires once, for its database
        _case(
            "30m",
            "VdistreamJobFailed",
            _expected("VdistreamJobFailed", database="broken", kind="backup", outcome="failed"),
        ),
        _case(
            "30m",
            "VdistreamVerificationFailed",
            _expected(
                "VdistreamVerificationFailed", database="app", kind="verify", outcome="failed"
            ),
        ),
        _case("30m", "VdistreamDebrisFound", _expected("VdistreamDebrisFound", database="app")),
        # the slow job's last progress is held from minute 10: 600 s + 5 min later
        _case("24m", "VdistreamJobStalled"),
        _case("30m", "VdistreamJobStalled", _expected("VdistreamJobStalled", **slow)),
        _case("30m", "VdistreamBackupMissing"),
        # an hour later the failures are old news; the job ended (its series are gone)
        _case("3h", "VdistreamJobFailed"),
        _case("3h", "VdistreamVerificationFailed"),
        _case("3h", "VdistreamDebrisFound"),
        _case("3h", "VdistreamJobStalled"),
        # hourly "broken" never succeeded: 1.5 h + 15 min after the daemon started
        _case(
            "3h",
            "VdistreamBackupMissing",
            _expected("VdistreamBackupMissing", database="broken", **full),
        ),
        # daily "app": 36 h 15 min after its success, it is missing too
        _case(
            "36h",
            "VdistreamBackupMissing",
            _expected("VdistreamBackupMissing", database="broken", **full),
        ),
        _case(
            "41h",
            "VdistreamBackupMissing",
            _expected("VdistreamBackupMissing", database="app", **full),
            _expected("VdistreamBackupMissing", database="broken", **full),
        ),
    ]
    shutil.copy(RULES, tmp_path / RULES.name)
    test_file = tmp_path / "vdistream-test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [RULES.name],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": cases}],
            },
            sort_keys=False,
        )
    )
    done = subprocess.run(
        [_promtool(), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    assert "SUCCESS" in done.stdout


def test_promtool_test_rules_can_fail(run: Run, tmp_path: Path) -> None:
    """The same input with a wrong expectation (no failed job) makes promtool fail:
    the test above checks something."""
    s0, s1, s2 = run.scrapes
    series = _input_series([(0, s0), (10, s1), (40, s2)], 60)
    shutil.copy(RULES, tmp_path / RULES.name)
    test_file = tmp_path / "wrong-test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [RULES.name],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": series,
                        "alert_rule_test": [_case("30m", "VdistreamJobFailed")],
                    }
                ],
            }
        )
    )
    done = subprocess.run(
        [_promtool(), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert 'database="broken"' in done.stdout + done.stderr


# ------------------------------------------------------------------------- dashboard

#: PromQL's functions, aggregations and keywords, and Grafana's query functions
_PROMQL_WORDS = frozenset(
    (
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "rate",
        "irate",
        "increase",
        "delta",
        "idelta",
        "deriv",
        "histogram_quantile",
        "time",
        "vector",
        "scalar",
        "abs",
        "ceil",
        "floor",
        "round",
        "clamp",
        "clamp_min",
        "clamp_max",
        "label_replace",
        "label_join",
        "sort",
        "sort_desc",
        "timestamp",
        "absent",
        "absent_over_time",
        "changes",
        "resets",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
        "count_over_time",
        "last_over_time",
        "predict_linear",
        "label_values",
        "inf",
        "nan",
        "le",
    )
)


def _names_in(expr: str) -> set[str]:
    """The metric names ``expr`` uses: identifiers outside strings, label matchers,
    ranges and Grafana's ``$variables``, that are not PromQL's own words."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\$\w+", "", text)
    text = re.sub(r"(label_values\([^,()]*),\s*\w+\s*\)", r"\1)", text)  # its label
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w.lower() not in _PROMQL_WORDS}


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def _check_names(exprs: list[str], exported: frozenset[str], extra: Callable[[str], bool]) -> None:
    assert exprs
    unknown = {
        (name, expr)
        for expr in exprs
        for name in _names_in(expr)
        if name not in exported and not extra(name)
    }
    assert not unknown, f"names the daemon does not export: {sorted(unknown)}"


def test_dashboard_is_valid_and_uses_only_exported_metrics(run: Run) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "vdistream"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " / ".join(p["title"] for p in panels)
    for wanted in ("last successful backup", "duration", "Throughput", "Per-device progress"):
        assert wanted.lower() in titles.lower(), titles
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    exprs = list(_exprs(dashboard))
    _check_names(exprs, run.names, lambda name: False)
    used = {name for expr in exprs for name in _names_in(expr)}
    assert "vdistream_job_device_bytes" in used
    assert "vdistream_last_success_timestamp_seconds" in used


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel's query, Grafana's variables given values, parses as PromQL:
    ``promtool check rules`` on them as recording rules."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {"$__rate_interval": "2m", "$__range": "1d", "$instance": ".*", "$database": ".*"}
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for variable, value in values.items():
                expr = expr.replace(variable, value)
            exprs.append(expr)
    rules = [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


def test_rules_use_only_exported_metrics(run: Run) -> None:
    exprs = [rule["expr"] for rule in _alerts().values()]
    _check_names(exprs, run.names, lambda name: False)


def test_the_name_check_finds_an_unknown_metric(run: Run) -> None:
    with pytest.raises(AssertionError, match="vdistream_no_such_metric"):
        _check_names(
            ['sum by (database) (rate(vdistream_no_such_metric{database="x"}[5m]))'],
            run.names,
            lambda name: False,
        )
