"""The `umcef` command line: serve, publish, tail, demo, config check, route explain, dlq list/replay,
spool list/dead-letter.

Bad input prints one clear line on stderr and exits non-zero; never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click
import orjson
from rich.console import Console
from rich.markup import escape

from umcef.fabric import config as config_mod

if TYPE_CHECKING:
    from umcef.adapters.local import LocalStore
    from umcef.fabric import dlq

err = Console(stderr=True)


@click.group(help="UMCEF: a CloudEvents gateway for Kafka, SQS, Pub/Sub and Service Bus.")
def app() -> None:
    pass


@app.group("config", help="Inspect configuration files.")
def config_app() -> None:
    pass


class CliError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def _load_config(path: Path | None, **overrides: Any) -> config_mod.Config:
    env = dict(os.environ)
    labels: dict[str, str] = {}  # a flag's value goes in as an override: a mistake in it names the flag
    for key, value in overrides.items():
        if value is not None:
            env["UMCEF_" + key.upper()] = str(value)
            labels["UMCEF_" + key.upper()] = "--" + key.split("__")[-1].replace("_", "-")
    return config_mod.load(path, env, labels)


@app.command()
@click.option("--config", "-c", "config", type=click.Path(path_type=Path), help="YAML configuration file")
@click.option("--host", help="HTTP/gRPC bind address")
@click.option("--port", type=int, help="HTTP port")
@click.option("--grpc-port", "grpc_port", type=int, help="gRPC port")
@click.option("--data-dir", "data_dir", type=click.Path(path_type=Path), help="embedded store directory")
def serve(config: Path | None, host: str | None, port: int | None, grpc_port: int | None,
          data_dir: Path | None) -> None:
    """Run the gateway (the embedded local store when no destinations are configured)."""
    from umcef.adapters.local import StoreFileError
    from umcef.fabric.gateway import Gateway
    from umcef.fabric.runtime import configure_logging, tune_interpreter

    cfg = _load_config(config, server__host=host, server__port=port, server__grpc_port=grpc_port,
                       data_dir=data_dir)
    configure_logging()
    _use_uvloop()

    async def run() -> None:
        try:
            gateway = Gateway(cfg)  # opens the store first
        except StoreFileError as exc:
            raise CliError(str(exc)) from None
        signalled = gateway.signalled()
        endpoints = await gateway.start()
        tune_interpreter()
        grpc = f", gRPC on {cfg.server.host}:{endpoints.grpc_port}" if endpoints.grpc_port else ""
        if gateway.delivery_process is not None:
            err.print(f"umcef: delivery in process {gateway.delivery_process.pid}", highlight=False,
                      markup=False, soft_wrap=True)
        # One line however long (not wrapped at 80 columns when stderr is no terminal): logs are grepped for it.
        err.print(f"umcef: HTTP on http://{cfg.server.host}:{endpoints.http_port}{grpc}; "
                  f"store {cfg.data_dir}", highlight=False, markup=False, soft_wrap=True)
        await gateway.run_until(signalled)

    asyncio.run(run())


@app.command()
@click.option("--type", "event_type", help="event type")
@click.option("--source", help="event source (URI-reference)")
@click.option("--id", "event_id", help="event id (default: a UUID)")
@click.option("--subject", help="event subject")
@click.option("--data", help="event data: JSON text, or @FILE")
@click.option("--datacontenttype", "content_type", help="data media type")
@click.option("--ext", multiple=True, help="extension NAME=VALUE (repeatable)")
@click.option("--file", "-f", "file", type=click.Path(path_type=Path), help="events from a JSON array or JSONL file")
@click.option("--url", default="http://127.0.0.1:8080", show_default=True,
              help="gateway URL (grpc://host:port for gRPC)")
@click.option("--timeout", default=10.0, show_default=True, help="seconds per attempt")
@click.option("--batch-size", "batch_size", default=500, show_default=True, type=click.IntRange(min=1),
              help="events per request with --file (the gateway takes at most limits.max_batch, 1000 by default)")
def publish(event_type: str | None, source: str | None, event_id: str | None, subject: str | None,
            data: str | None, content_type: str | None, ext: tuple[str, ...], file: Path | None, url: str,
            timeout: float, batch_size: int) -> None:
    """Publish one event from flags, or every event of a file, and print the accepted ids."""
    from umcef.fabric.sdk import Publisher

    events = list(_events_from_file(file)) if file else [_event_from_flags(
        event_type, source, event_id, subject, data, content_type, list(ext))]
    if not events:
        raise CliError(f"{file} holds no events (expected a JSON array of events or one event per line)")
    try:
        publisher = Publisher(url=url, transport=_transport_for(url), timeout=timeout)
    except ValueError as exc:  # the SDK's check of its arguments: a URL without host:port, a timeout of 0
        raise CliError(str(exc)) from None
    with publisher:
        if len(events) == 1:
            click.echo(publisher.publish(events[0]))
            return
        # Each request's ids as soon as it is accepted: if a later one fails, what went through is on stdout
        # (publishing the file again is safe: the gateway deduplicates on source and id).
        for start in range(0, len(events), batch_size):
            for event_id_ in publisher.publish_batch(events[start:start + batch_size]):
                click.echo(event_id_)


def _transport_for(url: str) -> Literal["http", "grpc"]:
    scheme, sep, _ = url.partition("://")
    if sep and scheme.lower() in ("grpc", "grpcs"):
        return "grpc"
    if sep and scheme.lower() in ("http", "https"):
        return "http"
    raise CliError(f"--url {url!r}: expected a gateway URL of http://, https://, grpc:// or grpcs:// "
                   f"(as grpc://HOST:PORT)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _event_from_flags(event_type: str | None, source: str | None, event_id: str | None, subject: str | None,
                      data: str | None, content_type: str | None, ext: list[str]) -> dict[str, Any]:
    if not event_type or not source:
        raise CliError("publish needs --type and --source (or --file)")
    if event_id == "":
        raise CliError("--id must not be empty: a CloudEvent id is a non-empty string (omit --id for a UUID)")
    event: dict[str, Any] = {"type": event_type, "source": source}
    if event_id is not None:
        event["id"] = event_id
    if subject:
        event["subject"] = subject
    for item in ext:
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--ext {item!r}: expected NAME=VALUE")
        event[name] = value
    if data is not None:
        text = _read_text(Path(data[1:])) if data.startswith("@") else data
        try:
            event["data"] = orjson.loads(text)
            event["datacontenttype"] = content_type or "application/json"
        except orjson.JSONDecodeError:
            event["data"] = text
            event["datacontenttype"] = content_type or "text/plain"
    return event


def _events_from_file(path: Path) -> Iterator[dict[str, Any]]:
    text = _read_text(path)
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            items = orjson.loads(text)
            yield from items
            return
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise CliError(f"{path}:{number}: not valid JSON ({exc})") from None
    except orjson.JSONDecodeError as exc:
        raise CliError(f"{path}: not valid JSON ({exc})") from None


@app.command()
@click.option("--data-dir", "data_dir", type=click.Path(path_type=Path), default=Path("umcef-data"),
              show_default=True, help="embedded store directory")
@click.option("--topic", help="only this topic (default: all)")
@click.option("--from-beginning", "from_beginning", is_flag=True, help="start at the oldest event")
@click.option("--json", "as_json", is_flag=True, help="one structured-mode JSON event per line")
@click.option("--follow/--no-follow", default=True, show_default=True, help="keep waiting for new events")
def tail(data_dir: Path, topic: str | None, from_beginning: bool, as_json: bool, follow: bool) -> None:
    """Print events from the embedded store, oldest first, then follow new ones."""
    store = _open_store(data_dir, write=False)  # read-only: never runs retention or writes
    out = Console(highlight=False)
    try:
        after = 0 if from_beginning else store.last_seq(topic)
        while True:
            batch = store.read(topic, after, 1000)
            for stored in batch:
                after = stored.seq
                if as_json:
                    sys.stdout.write(stored.payload.decode("utf-8") + "\n")
                else:
                    event = orjson.loads(stored.payload)
                    stamp = time.strftime("%H:%M:%S", time.localtime(stored.stored_at))
                    # One line however long (grep); the event's own text is never read as markup.
                    out.print(f"[dim]{stamp} #{stored.seq}[/] [cyan]{escape(stored.topic)}[/] "
                              f"{escape(str(event.get('type')))} id={escape(str(event.get('id')))} "
                              f"key={escape(str(stored.key))}", soft_wrap=True)
            sys.stdout.flush()
            if not batch:
                if not follow:
                    return
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


@app.command()
@click.option("--data-dir", "data_dir", type=click.Path(path_type=Path), help="store directory (default: a temp dir)")
@click.option("--customers", default=200, show_default=True, help="customers to simulate")
def demo(data_dir: Path | None, customers: int) -> None:
    """Start a gateway on the embedded store, publish an order/customer workload, show where it landed."""
    from umcef.fabric.demo import main as demo_main

    _use_uvloop()
    demo_main(data_dir or Path(tempfile.mkdtemp(prefix="umcef-demo-")), customers)


@config_app.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def config_check(path: Path) -> None:
    """Validate a configuration file and summarise it."""
    cfg = config_mod.load(path)
    click.echo(f"{path}: ok — {len(cfg.destinations)} destinations, {len(cfg.routes)} routes, "
               f"default {cfg.default_destination}")


@app.group("route", help="Inspect routing decisions.")
def route_app() -> None:
    pass


@route_app.command("explain")
@click.option("--config", "-c", "config", type=click.Path(path_type=Path), required=True,
              help="YAML configuration file")
@click.option("--assume-rtt", "assume_rtt", multiple=True, metavar="DEST=MS",
              help="pretend DEST's round-trip time is MS milliseconds (repeatable)")
@click.option("--assume-down", "assume_down", multiple=True, metavar="DEST",
              help="pretend DEST is down: ejected (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.argument("event", type=click.Path(path_type=Path))
def route_explain(config: Path, assume_rtt: tuple[str, ...], assume_down: tuple[str, ...], as_json: bool,
                  event: Path) -> None:
    """Where would EVENT (a JSON CloudEvent) go, and why: every candidate's score or exclusion."""
    from umcef.router import explain as explain_mod

    cfg = config_mod.load(config)
    names = [d.name for d in cfg.routing.destinations]
    try:
        rtts = explain_mod.parse_assumed_rtts(assume_rtt, names)
        decision = explain_mod.explain(cfg.routing, explain_mod.load_event(event), rtts, assume_down)
    except explain_mod.ExplainError as exc:
        raise CliError(str(exc)) from None
    click.echo(explain_mod.render_json(decision) if as_json else explain_mod.render_text(decision))


@app.group("dlq", help="Inspect and re-drive the dead-letter queues: _deadletter and the destinations named by "
                       "delivery.dead_letter in the configuration.")
def dlq_app() -> None:
    pass


_DATA_DIR = click.option("--data-dir", "data_dir", type=click.Path(path_type=Path),
                         help="the gateway's store directory, running or stopped (default: the configuration's "
                              "data_dir, umcef-data)")
_DLQ_CONFIG = click.option("--config", "-c", "config", type=click.Path(path_type=Path),
                           help="the gateway's YAML configuration (as umcef serve takes): data_dir, dead-letter "
                                "destinations, local destinations' topics")
_DLQ_NAME = click.option("--dlq", "dlqs", multiple=True, metavar="NAME",
                         help="only this dead-letter destination: _deadletter or a configured one (repeatable; "
                              "default: all)")


def _dlq_setup(config: Path | None, data_dir: Path | None,
               dlqs: tuple[str, ...]) -> tuple[config_mod.Config, Path, list[dlq.DlqTarget]]:
    """The configuration (defaults and UMCEF_* overrides without --config, as `serve`), the store directory
    (--data-dir wins over the configuration's data_dir) and the dead-letter destinations asked for."""
    from umcef.fabric import dlq

    cfg = _load_config(config, data_dir=data_dir)
    try:
        chosen = dlq.choose(dlq.targets(cfg), dlqs, None if config is None else str(config))
    except dlq.DlqError as exc:
        raise CliError(str(exc)) from None
    return cfg, cfg.data_dir, chosen


def _plural(n: int, noun: str = "dead letter") -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dlq_app.command("list")
@_DLQ_CONFIG
@_DATA_DIR
@_DLQ_NAME
@click.option("--destination", help="only events dead-lettered from this destination")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def dlq_list(config: Path | None, data_dir: Path | None, dlqs: tuple[str, ...], destination: str | None,
             as_json: bool) -> None:
    """Dead letters not replayed yet (and those still waiting in a remote dead-letter destination's spool):
    entry, dead-letter destination, id, type, destination, attempts, reason."""
    from umcef.fabric import dlq

    _cfg, data_dir, targets = _dlq_setup(config, data_dir, dlqs)
    store = _open_store(data_dir, write=False)
    try:
        letters = dlq.pending(store, destination, targets)
    finally:
        store.close()
    for letter in letters:
        row = letter.summary()
        if as_json:
            click.echo(orjson.dumps(row).decode())
        else:
            click.echo(f"#{row['seq']}\t{row['dlq']}\t{row['id']}\t{row['type']}\t{row['destination']}\t"
                       f"attempts={row['attempts']}\t{row['reason']}")
    for target in targets:
        n = sum(1 for letter in letters if letter.dlq is target)
        if target.remote:
            err.print(f"{target.name}: {_plural(n)} waiting in spool {target.topic} for {target.url}; those "
                      f"already delivered are in the broker, not listed here (read them there)",
                      highlight=False, markup=False, soft_wrap=True)
        else:
            err.print(f"{target.name}: {_plural(n)} pending ({target.where})", highlight=False, markup=False,
                      soft_wrap=True)
    err.print(f"{_plural(len(letters))} listed from {data_dir}", highlight=False, markup=False, soft_wrap=True)


@dlq_app.command("replay")
@_DLQ_CONFIG
@_DATA_DIR
@_DLQ_NAME
@click.option("--destination", help="only events dead-lettered from this destination")
@click.option("--id", "ids", multiple=True, help="event id to replay (repeatable)")
@click.option("--all", "replay_all", is_flag=True,
              help="replay every pending dead letter of the local dead-letter queues (after --dlq, --destination)")
@click.option("--to", "to", help="send them to this destination (or local://TOPIC) instead of their own")
def dlq_replay(config: Path | None, data_dir: Path | None, dlqs: tuple[str, ...], destination: str | None,
               ids: tuple[str, ...], replay_all: bool, to: str | None) -> None:
    """Re-drive dead-lettered events into their destination's spool, once: replayed entries leave the list."""
    from umcef.fabric import dlq

    cfg, data_dir, targets = _dlq_setup(config, data_dir, dlqs)
    # (--destination may name a destination removed since: it only selects what was dead-lettered from it.)
    if config is not None and to is not None and not to.startswith(dlq.LOCAL_PREFIX) and to not in cfg.destinations:
        raise CliError(f"destination {to!r} is not in {config}")
    if ids and replay_all:
        raise CliError("give --id or --all, not both")
    remote = [t for t in targets if t.remote]
    if dlqs and remote:  # asked for by name: say we cannot, rather than skip it
        raise CliError(dlq.not_replayable(remote[0]))
    local_topics = {name: d.topic for name, d in cfg.destinations.items()}
    store = _open_store(data_dir, write=True)
    try:
        letters = dlq.pending(store, destination, targets)
        if not letters and config is not None and destination is not None and destination not in cfg.destinations:
            raise CliError(f"no pending dead letter from destination {destination!r} (not in {config} either)")
        chosen = dlq.select(letters, ids, replay_all, targets)
        if config is not None and to is None:
            gone = next((d for d in chosen if d.destination not in ("", dlq.ROUTER_DEST, *cfg.destinations)), None)
            if gone is not None:  # its spool has no worker any more: the replay would strand the event there
                raise CliError(f"dead letter {gone.id} (#{gone.seq}) was dead-lettered from {gone.destination!r}, "
                               f"which is not in {config}: replay those with --destination {gone.destination} "
                               f"--to DEST")
        plan = dlq.replay(store, chosen, to, local_topics)
    except dlq.DlqError as exc:
        raise CliError(str(exc)) from None
    finally:
        store.close()
    for letter, topic in plan:
        click.echo(f"#{letter.seq}\t{letter.dlq.name}\t{letter.id}\t-> {topic}")
    for target in remote if replay_all else ():
        waiting = sum(1 for letter in letters if letter.dlq is target)
        if waiting:
            err.print(f"{target.name}: {_plural(waiting)} waiting in spool {target.topic} not replayed: "
                      + dlq.not_replayable(target), highlight=False, markup=False, soft_wrap=True)
    err.print(f"replayed {_plural(len(plan))}", highlight=False, markup=False, soft_wrap=True)


@app.group("spool", help="Inspect the delivery spools; dead-letter the undelivered events of a destination "
                         "removed from the configuration.")
def spool_app() -> None:
    pass


_SPOOL_CONFIG = click.option("--config", "-c", "config", type=click.Path(path_type=Path),
                             help="the gateway's YAML configuration (as umcef serve takes): data_dir and which "
                                  "destinations still deliver their spools")


@spool_app.command("list")
@_SPOOL_CONFIG
@_DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def spool_list(config: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Each spool: destination, configured or not (with --config), undelivered events, the oldest one's age,
    records stored (delivered ones not trimmed yet included), undelivered events that failed at least once
    and the most attempts one of them had."""
    from umcef.fabric import spools

    cfg = _load_config(config, data_dir=data_dir)
    store = _open_store(cfg.data_dir, write=False)
    try:
        found = spools.states(store, None if config is None else spools.remote_destinations(cfg))
    finally:
        store.close()
    now = time.time()
    for state in found:
        row = state.summary(now)
        if as_json:
            click.echo(orjson.dumps(row).decode())
            continue
        status = {None: "-", True: "configured", False: "NOT CONFIGURED"}[state.configured]
        oldest = row["oldest_undelivered_age_s"]
        click.echo(f"{state.topic}\t{state.destination}\t{status}\tundelivered={state.undelivered}\t"
                   f"oldest={'-' if oldest is None else spools.age(oldest)}\tstored={state.stored}\t"
                   f"failing={state.failing}\tmost_attempts={state.most_attempts}")
    orphans = [s for s in found if s.orphaned]
    for state in orphans:
        dead_letter, replay = spools.redrive_commands(state.destination, config)
        err.print(f"{state.topic}: {state.undelivered} undelivered events and no configured destination "
                  f"{state.destination!r} to deliver them: {dead_letter}, then {replay}",
                  highlight=False, markup=False, soft_wrap=True)
    if config is None:
        err.print("without --config it is not known which spools a destination still delivers",
                  highlight=False, markup=False, soft_wrap=True)
    err.print(f"{_plural(len(found), 'spool')} in {cfg.data_dir}", highlight=False, markup=False, soft_wrap=True)


@spool_app.command("dead-letter")
@click.argument("destination")
@_SPOOL_CONFIG
@_DATA_DIR
@click.option("--reason", help="the fabricreason the dead letters carry (default: the destination is no longer "
                               "configured)")
def spool_dead_letter(destination: str, config: Path | None, data_dir: Path | None, reason: str | None) -> None:
    """Move the undelivered events of DESTINATION's spool to the dead-letter queue _deadletter, with a reason,
    when DESTINATION is no longer in the configuration; `umcef dlq replay --destination DESTINATION --to NEW`
    re-drives them. Restart the gateway with that configuration first: a spool a running gateway still delivers
    is refused (it marks them every 2 s)."""
    from umcef.fabric import spools
    from umcef.fabric.delivery import spool_topic

    if config is None:
        raise CliError("spool dead-letter needs --config FILE: the gateway's configuration says whether "
                       f"{destination!r} still has a delivery worker")
    cfg = _load_config(config, data_dir=data_dir)
    store = _open_store(cfg.data_dir, write=True)
    try:
        moved = spools.dead_letter(store, destination, reason or spools.default_reason(destination),
                                   spools.remote_destinations(cfg))
    except spools.SpoolError as exc:
        raise CliError(str(exc)) from None
    finally:
        store.close()
    err.print(f"dead-lettered {_plural(moved.events, 'event')} of {spool_topic(destination)} to _deadletter; "
              f"re-drive them with {spools.redrive_commands(destination, config)[1]}",
              highlight=False, markup=False, soft_wrap=True)
    if moved.undecodable:
        err.print(f"{_plural(moved.undecodable, 'record')} of them undecodable, moved as they were: umcef dlq list "
                  f"shows them", highlight=False, markup=False, soft_wrap=True)


def _open_store(data_dir: Path, *, write: bool) -> LocalStore:
    from umcef.adapters.local import StoreFileError
    from umcef.fabric import dlq

    try:
        return dlq.open_store(data_dir, write=write)
    except dlq.DlqError as exc:
        raise CliError(str(exc)) from None
    except StoreFileError as exc:  # the file is no store of ours (another application's, not SQLite, too new)
        raise CliError(str(exc)) from None


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def main() -> None:
    from umcef.fabric.errors import EventError
    from umcef.fabric.sdk import PublishError

    try:
        code = app(standalone_mode=False, prog_name="umcef")
    except click.ClickException as exc:  # usage errors: click's own one-line message
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    except (CliError, config_mod.ConfigError, EventError) as exc:
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except PublishError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"error: {exc.strerror or exc}{where}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
