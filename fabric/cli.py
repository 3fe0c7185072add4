"""The `umcef` command line: serve, publish, tail, demo, config check.

Bad input prints one clear line on stderr and exits non-zero; never a traceback.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from umcef.fabric import config as config_mod

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="UMCEF: a CloudEvents gateway for Kafka, SQS, Pub/Sub and Service Bus.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration files.")
app.add_typer(config_app, name="config")
err = Console(stderr=True)


class CliError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def _load_config(path: Path | None, **overrides: Any) -> config_mod.Config:
    env = dict(config_mod.os.environ)
    for key, value in overrides.items():
        if value is not None:
            env["UMCEF_" + key.upper()] = str(value)
    return config_mod.load(path, env)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration file")] = None,
    host: Annotated[str | None, typer.Option(help="HTTP/gRPC bind address")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port")] = None,
    grpc_port: Annotated[int | None, typer.Option("--grpc-port", help="gRPC port")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="embedded store directory")] = None,
) -> None:
    """Run the gateway (the embedded local store when no destinations are configured)."""
    from umcef.fabric.gateway import Gateway

    cfg = _load_config(config, server__host=host, server__port=port, server__grpc_port=grpc_port,
                       data_dir=data_dir)
    _use_uvloop()

    async def run() -> None:
        gateway = Gateway(cfg)
        endpoints = await gateway.start()
        grpc = f", gRPC on {cfg.server.host}:{endpoints.grpc_port}" if endpoints.grpc_port else ""
        err.print(f"umcef: HTTP on http://{cfg.server.host}:{endpoints.http_port}{grpc}; "
                  f"store {cfg.data_dir}", highlight=False)
        await gateway.run_until_signalled()

    asyncio.run(run())


@app.command()
def publish(
    event_type: Annotated[str | None, typer.Option("--type", help="event type")] = None,
    source: Annotated[str | None, typer.Option(help="event source (URI-reference)")] = None,
    event_id: Annotated[str | None, typer.Option("--id", help="event id (default: a UUID)")] = None,
    subject: Annotated[str | None, typer.Option(help="event subject")] = None,
    data: Annotated[str | None, typer.Option(help="event data: JSON text, or @FILE")] = None,
    content_type: Annotated[str | None, typer.Option("--datacontenttype", help="data media type")] = None,
    ext: Annotated[list[str] | None, typer.Option("--ext", help="extension NAME=VALUE (repeatable)")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="events from a JSON array or JSONL file")] = None,
    url: Annotated[str, typer.Option(help="gateway URL (grpc://host:port for gRPC)")] = "http://127.0.0.1:8080",
    timeout: Annotated[float, typer.Option(help="seconds per attempt")] = 10.0,
) -> None:
    """Publish one event from flags, or every event of a file, and print the accepted ids."""
    from umcef.fabric.sdk import Publisher

    events = list(_events_from_file(file)) if file else [_event_from_flags(
        event_type, source, event_id, subject, data, content_type, ext or [])]
    transport = "grpc" if url.startswith("grpc://") else "http"
    target = url.removeprefix("grpc://") if transport == "grpc" else url
    with Publisher(url=target, transport=transport, timeout=timeout) as publisher:
        ids = publisher.publish_batch(events) if len(events) > 1 else [publisher.publish(events[0])]
    for event_id_ in ids:
        typer.echo(event_id_)


def _event_from_flags(event_type: str | None, source: str | None, event_id: str | None, subject: str | None,
                      data: str | None, content_type: str | None, ext: list[str]) -> dict[str, Any]:
    if not event_type or not source:
        raise CliError("publish needs --type and --source (or --file)")
    event: dict[str, Any] = {"type": event_type, "source": source}
    if event_id:
        event["id"] = event_id
    if subject:
        event["subject"] = subject
    for item in ext:
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--ext {item!r}: expected NAME=VALUE")
        event[name] = value
    if data is not None:
        text = Path(data[1:]).read_text(encoding="utf-8") if data.startswith("@") else data
        try:
            event["data"] = orjson.loads(text)
            event["datacontenttype"] = content_type or "application/json"
        except orjson.JSONDecodeError:
            event["data"] = text
            event["datacontenttype"] = content_type or "text/plain"
    return event


def _events_from_file(path: Path) -> Iterator[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
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
def tail(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="embedded store directory")] = Path("umcef-data"),
    topic: Annotated[str | None, typer.Option(help="only this topic (default: all)")] = None,
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="start at the oldest event")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one structured-mode JSON event per line")] = False,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="keep waiting for new events")] = True,
) -> None:
    """Print events from the embedded store, oldest first, then follow new ones."""
    from umcef.adapters.local import LocalStore

    if not (data_dir / "events.db").exists() and not any(data_dir.glob("*.db")):
        raise CliError(f"no UMCEF store in {data_dir} (start the gateway with --data-dir {data_dir})")
    store = LocalStore(data_dir)
    out = Console(highlight=False)
    try:
        after = 0 if from_beginning else max((e.seq for e in store.read(topic, 0, 1_000_000_000)), default=0)
        while True:
            batch = store.read(topic, after, 1000)
            for stored in batch:
                after = stored.seq
                if as_json:
                    sys.stdout.write(stored.payload.decode("utf-8") + "\n")
                else:
                    event = orjson.loads(stored.payload)
                    stamp = time.strftime("%H:%M:%S", time.localtime(stored.stored_at))
                    out.print(f"[dim]{stamp} #{stored.seq}[/] [cyan]{stored.topic}[/] {event.get('type')} "
                              f"id={event.get('id')} key={stored.key}")
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
def demo(
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="store directory (default: a new temp dir)")] = None,
    customers: Annotated[int, typer.Option(help="customers to simulate")] = 200,
) -> None:
    """Start a gateway on the embedded store, publish an order/customer workload, show where it landed."""
    from umcef.fabric.demo import main as demo_main

    _use_uvloop()
    demo_main(data_dir or Path(tempfile.mkdtemp(prefix="umcef-demo-")), customers)


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="YAML configuration file")]) -> None:
    """Validate a configuration file and summarise it."""
    cfg = config_mod.load(path)
    typer.echo(f"{path}: ok — {len(cfg.destinations)} destinations, {len(cfg.routes)} routes, "
               f"default {cfg.default_destination}")


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def main() -> None:
    import click

    from umcef.fabric.errors import EventError
    from umcef.fabric.sdk import PublishError

    try:
        code = app(standalone_mode=False)
    except click.ClickException as exc:  # usage errors: click's own one-line message
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    except (CliError, config_mod.ConfigError, EventError) as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(2)
    except PublishError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(1)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"error: {exc.strerror or exc}{where}", highlight=False, markup=False)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
