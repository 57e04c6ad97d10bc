"""`inspector sku`: signed SKU bundles and the station's version store (inspector/bundle.py, inspector/skustore.py).

    inspector sku keygen --out DIR                             a signing key pair: DIR/sku-signing.key and .pub
    inspector sku pack --sku-dir DIR --key PRIV --out FILE     FILE (the bundle) and FILE.sig
    inspector sku install FILE|URL [--sku NAME]                verify it, then add it as a version (not active)
    inspector sku list [--sku NAME]                            the versions in the store, the active ones marked
    inspector sku activate --sku NAME VERSION [--live]         pre-flight it, then make it NAME's active version
    inspector sku rollback --sku NAME [--live]                 back to the version active before
    inspector sku update --sku NAME --add-good DIR|--from-reviews [--good DIR] [--activate]
                                                               teach the active version more good parts: a new version

install, list, activate and rollback work on the store of the station's config ([store] dir, trusted_keys).
activate and rollback swap the link offline (the daemon runs the version from its next load of the SKU); with
--live they ask the running daemon instead, through its station page's controls (web.token_file), to do it and
reload the SKU (inspector/activation.py), and print its reply once the version inspects. Not over MQTT: the
broker's ACL lets a station's user read its own /cmd, never write it (deploy/mosquitto/acl).
Each action is one entry of ACTIONS: (add its arguments, run it, one-line help).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foundation.errors import ConfigError, DataError
from inspector.bundle import install, key_id, keygen, load_public_key, pack, plan_target, signature_path
from inspector.cli import config_parent
from inspector.config import InspectorConfig, load_config
from inspector.preflight import version_check
from inspector.skustore import ACTIVE_LINK, SkuStore

Action = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
LIVE_TIMEOUT_S = 600.0  # --live: the daemon answers once the new engine inspects; TensorRT plans take a while


def _actor() -> str:
    """Who runs the command, for the history: the user, and the one behind sudo when there is one."""
    user, behind = getpass.getuser(), os.environ.get("SUDO_USER")
    return f"{user} (sudo by {behind})" if behind and behind != user else user


def _store_config(args: argparse.Namespace) -> tuple[InspectorConfig, SkuStore]:
    """The station's config and its version store."""
    config = load_config(args.config)
    return config, SkuStore(config.store.dir)


def _keygen_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sku keygen`."""
    parser.add_argument("--out", type=Path, required=True, help="folder to write NAME.key (0600) and NAME.pub to")
    parser.add_argument("--name", default="sku-signing", help="file name of the pair (default: sku-signing)")


def _keygen(args: argparse.Namespace) -> int:
    """Write a key pair and say where each half goes."""
    private, public = keygen(args.out, args.name)
    print(f"wrote {private} (private: keep it on the packing box, never on a station) and {public} (key id "
          f"{key_id(load_public_key(public))}: add it to [store] trusted_keys of each station)")
    return 0


def _pack_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sku pack`."""
    parser.add_argument("--sku-dir", type=Path, required=True, help="the SKU folder to pack")
    parser.add_argument("--key", type=Path, required=True, help="the private key to sign with (sku keygen)")
    parser.add_argument("--out", type=Path, required=True, help="the bundle file to write (FILE.sig beside it)")
    parser.add_argument("--name", help="the SKU's name in the bundle (default: the folder's name)")


def _pack(args: argparse.Namespace) -> int:
    """Pack and sign a SKU folder; print what the bundle holds."""
    manifest = pack(args.sku_dir, args.key, args.out, sku=args.name)
    print(f"wrote {args.out} and {signature_path(args.out).name}: SKU {manifest.sku} version {manifest.version_id}, "
          f"{len(manifest.files)} files, {len(manifest.plans)} TensorRT plans, eval report "
          f"{'included' if manifest.eval_report else 'none'}")
    return 0


def _install_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sku install`."""
    parser.add_argument("bundle", help="the bundle file, or an https URL (its .sig at URL.sig)")
    parser.add_argument("--sku", help="install as this SKU (default: the name in the bundle)")


def _install(args: argparse.Namespace) -> int:
    """Verify and add a bundle to the station's store, checking plans against this GPU on tensorrt."""
    config, store = _store_config(args)
    done = install(store, args.bundle, config.store.trusted_keys, sku=args.sku, target=plan_target(config.engine),
                   ca_file=config.store.ca_file, actor=_actor())
    what = "already installed" if done.already else "installed"
    print(f"{what}: SKU {done.sku} version {done.version_id} in {done.path}; make it live with: inspector sku "
          f"activate --sku {done.sku} {done.version_id}")
    return 0


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sku list`."""
    parser.add_argument("--sku", help="only this SKU")


def _list(args: argparse.Namespace) -> int:
    """Print one row per version: SKU, id, active mark, created, origin, source."""
    _, store = _store_config(args)
    names = [args.sku] if args.sku else store.skus()
    rows = [(v.sku, v.id, "*" if v.active else "", v.created, v.origin, v.source)
            for name in names for v in store.versions(name)]
    if not rows:
        print(f"no SKU versions in {store.root}" + (f" for SKU {args.sku}" if args.sku else ""))
        return 0
    header = ("SKU", "VERSION", "ACTIVE", "CREATED", "ORIGIN", "SOURCE")
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header) - 1)]
    for row in (header, *rows):
        print("  ".join([*(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False)), str(row[-1])]))
    return 0


def _change_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sku rollback` (and of `sku activate`, which adds VERSION)."""
    parser.add_argument("--sku", required=True, help="the SKU (a folder of the store)")
    parser.add_argument("--reason", default="", help="why, for the history (e.g. a change ticket)")
    parser.add_argument("--live", action="store_true",
                        help="ask the running daemon (through its station page) to do it and reload the SKU")


def _activate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sku activate`."""
    _change_arguments(parser)
    parser.add_argument("version", help="the version id (inspector sku list)")


def _activate(args: argparse.Namespace) -> int:
    """Pre-flight VERSION and make it the SKU's active version."""
    return _change(args, args.version, live=args.live)


def _rollback(args: argparse.Namespace) -> int:
    """Pre-flight the version active before and make it active again."""
    return _change(args, None, live=args.live)


def _change(args: argparse.Namespace, version: str | None, *, live: bool = False) -> int:
    """activate (version) or rollback (None) with the daemon's pre-flight of the version first; `live`: by the
    running daemon."""
    config, store = _store_config(args)
    if live:
        return _change_live(config, args.sku, version, args.reason)
    check = version_check(config, args.sku)
    if version is None:
        change = store.rollback(args.sku, check=check, actor=_actor(), reason=args.reason)
    else:
        change = store.activate(args.sku, version, check=check, actor=_actor(), reason=args.reason)
    if change.before == change.after:
        print(f"SKU {args.sku}: version {change.after} is active already; nothing changed")
        return 0
    print(f"SKU {args.sku}: version {change.after} is active (was {change.before or 'none'}); the daemon runs it "
          f"from its next load of the SKU (changeover or restart); to load it now in a running daemon: inspector sku "
          f"activate --live --sku {args.sku} {change.after}")
    link = store.root / args.sku / ACTIVE_LINK
    settings = config.skus.get(args.sku)
    if settings is None or settings.model_dir != link:
        print(f"note: no [skus.{args.sku}] model_dir = \"{link}\" in the station's config, so the daemon does not run "
              "this store's versions of it yet")
    return 0


def _change_live(config: InspectorConfig, sku: str, version: str | None, reason: str) -> int:
    """activate (version) or rollback (None) by the running daemon (module docstring); print its final reply, or
    raise its refusal as one line."""
    command = {"cmd": "rollback" if version is None else "activate", "sku": sku, "operator": _actor(),
               "reason": reason} | ({} if version is None else {"version": version})
    reply = _send_to_page(config, command)
    if not reply.get("ok"):
        raise DataError(f"SKU {sku}: {reply.get('error', reply)}")
    if reply.get("state") == "active":
        print(f"SKU {sku}: version {reply['version']} inspects (was {reply['from']}; loaded in {reply['load_s']} s)")
    else:
        print(f"SKU {sku}: version {reply['version']} is active (was {reply['from']}); another SKU inspects, so the "
              "daemon loads it at its next changeover to it")
    return 0


def _send_to_page(config: InspectorConfig, command: dict[str, str]) -> dict[str, Any]:
    """POST a control to the station page on this box with the token of web.token_file; the daemon's reply."""
    web = config.web
    token = web.read_token() if web.enabled else None
    if token is None or web.port == 0:
        raise ConfigError("--live asks the running daemon through its station page: it needs web.enabled = true, "
                          "web.token_file and a fixed web.port in the station's config; leave out --live to swap the "
                          "link offline")
    url = web.page_url() + "api/cmd"
    request = urllib.request.Request(url, data=json.dumps(command).encode(), method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the page is on this box: no proxy
    try:
        with opener.open(request, timeout=LIVE_TIMEOUT_S) as response:
            reply = json.load(response)
    except urllib.error.HTTPError as exc:  # a refusal comes as {"ok": false, "error": ...} with a 4xx
        with exc:
            try:
                reply = json.load(exc)
            except ValueError:
                raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"no station page answers at {url} ({getattr(exc, 'reason', exc)}): is the daemon running? "
                        "Leave out --live to swap the link offline") from None
    if not isinstance(reply, dict):
        raise DataError(f"{url} answered {str(reply)[:100]!r}, not a reply of the station page")
    return reply


def _update_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sku update`."""
    parser.add_argument("--sku", required=True, help="the SKU (a folder of the store) whose active version to teach")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--add-good", type=Path, metavar="DIR", help="a folder of good parts to teach (recursive)")
    what.add_argument("--from-reviews", action="store_true",
                      help="teach the parts operators reviewed as false rejects or confirmed OK (station page)")
    parser.add_argument("--good", type=Path, metavar="DIR",
                        help="good parts, apart from the taught ones, to re-fit the thresholds on (default: "
                             "skus.NAME.good_dir)")
    parser.add_argument("--activate", action="store_true",
                        help="pre-flight the new version and make it active (else: inspector sku activate later)")


def _update(args: argparse.Namespace) -> int:
    """Make the taught version, say what changed, and activate it when asked."""
    from inspector.skuupdate import update_sku  # torch and the exporter: only for this action

    config = load_config(args.config)
    done = update_sku(config, args.sku, add_good=args.add_good, from_reviews=args.from_reviews, good=args.good,
                      actor=_actor(), progress=lambda step: print(f"... {step}", flush=True))
    before, after = done.taught.memory
    print(f"SKU {args.sku}: version {done.version} made from {done.parent}: {done.taught.images} good parts taught, "
          f"memory {before} -> {after} entries, image threshold {done.image_threshold:.4g} on {done.good_parts} good "
          "parts")
    if not args.activate:
        print(f"make it live with: inspector sku activate --sku {args.sku} {done.version}")
        return 0
    args.reason = f"update of {done.parent}"
    return _change(args, done.version)


ACTIONS: dict[str, Action] = {
    "keygen": (_keygen_arguments, _keygen, "make an Ed25519 key pair to sign bundles with"),
    "pack": (_pack_arguments, _pack, "write a SKU folder as a signed bundle (FILE and FILE.sig)"),
    "install": (_install_arguments, _install, "verify a bundle (file or https URL) and add it to the store"),
    "list": (_list_arguments, _list, "list the versions in the store, the active ones marked *"),
    "activate": (_activate_arguments, _activate, "pre-flight a version, then make it the SKU's active one"),
    "rollback": (_change_arguments, _rollback, "make the version active before the current one active again"),
    "update": (_update_arguments, _update, "teach the active version more good parts (a folder, or reviewed false "
                                           "rejects) as a new version"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The actions of `inspector sku`, each with --config."""
    sub = parser.add_subparsers(dest="sku_command", metavar="ACTION", required=True)
    for name, (add, _, help_text) in ACTIONS.items():
        add(sub.add_parser(name, help=help_text, description=help_text, parents=[config_parent()]))


def run(args: argparse.Namespace) -> int:
    """Run the chosen action."""
    return ACTIONS[args.sku_command][1](args)
