"""What the cloud can do, asked once: the preflight of every run and the `check` command's report.

`assess` lists what stands in the way of one strategy; a run refuses to start on the first problem
(`preflight`), `check` prints them all with the facts behind them.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from glance_migrator.errors import CloudError, MigratorError, UsageError
from glance_migrator.glance import ADMIN_ROLES, LEGACY_SCHEMES, LOCATIONS_API, Glance, StoreInfo, release_of
from glance_migrator.sharing import SEE_LOCATIONS
from glance_migrator.state import Strategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    topic: str
    ok: bool
    detail: str
    error: type[MigratorError] = CloudError  # what preflight raises when not ok
    blocking: bool = True  # False: a doubt `check` reports, but a run goes ahead and lets Glance decide


@dataclass(frozen=True)
class CloudProfile:
    stores: list[StoreInfo] | None  # None: a legacy single-store Glance
    import_methods: list[str]
    locations_visible: bool | None  # None: no image to look at
    roles: frozenset[str]
    locations_api: bool | None = None  # GET /v2/images/{id}/locations answers us (None: not asked)
    api_version: tuple[int, int] | None = None  # Glance's newest image API version (None: unknown)

    @classmethod
    def read(cls, glance: Glance) -> CloudProfile:
        sample = next(iter(glance.list_images(limit=1)), None)
        visible = None if sample is None else "locations" in sample
        return cls(
            stores=glance.stores(),
            import_methods=glance.import_methods(),
            locations_visible=visible,
            roles=frozenset(glance.roles()),
            api_version=glance.api_version,
            locations_api=None if sample is None or visible else glance.image_locations(sample["id"]) is not None,
        )

    @property
    def sharing_unseen(self) -> bool:
        """Glance shows nobody's locations to us: who else uses data about to be deleted cannot be known."""
        return self.locations_visible is False and self.locations_api is False

    def store_type(self, store: str) -> str | None:
        if self.stores is None:  # legacy: the store *is* the backend
            return store
        return next((s.type for s in self.stores if s.id == store), None)

    @property
    def store_names(self) -> set[str]:
        return set(LEGACY_SCHEMES) if self.stores is None else {s.id for s in self.stores}


def choose_strategy(profile: CloudProfile, from_store: str) -> tuple[Strategy, str]:
    """`--strategy auto`: copy-image where Glance offers it for the source store, location-swap otherwise."""
    if profile.stores is None:
        return Strategy.LOCATION_SWAP, "this Glance has no multi-store (GET /v2/info/stores: 404)"
    if from_store not in profile.store_names:
        return Strategy.LOCATION_SWAP, f"store {from_store!r} is not configured in Glance"
    if "copy-image" not in profile.import_methods:
        return Strategy.LOCATION_SWAP, "copy-image is not in Glance's enabled_import_methods"
    return Strategy.COPY_IMAGE, "Glance offers copy-image and knows both stores"


def assess(
    profile: CloudProfile, from_store: str, to_store: str, strategy: Strategy, accept_unseen_sharing: bool = False
) -> list[Finding]:
    """Everything that stands in the way of `strategy` from `from_store` to `to_store` (empty: it can run)."""
    problems = []
    if from_store == to_store:
        problems.append(
            Finding(
                "stores", False, f"--from-store and --to-store are both {from_store!r}; nothing to move", UsageError
            )
        )
    known = profile.store_names
    for option, store in (("--from-store", from_store), ("--to-store", to_store)):
        if store not in known:
            problems.append(
                Finding(
                    "stores",
                    False,
                    f"{option} {store!r}: Glance has no such store (stores: {', '.join(sorted(known))})",
                    UsageError,
                )
            )
    if strategy == Strategy.COPY_IMAGE:
        if profile.stores is None:
            problems.append(
                Finding(
                    "copy-image",
                    False,
                    "this Glance has no multi-store (GET /v2/info/stores: 404), so no copy-image between stores; "
                    "use --strategy location-swap",
                )
            )
        elif "copy-image" not in profile.import_methods:
            problems.append(
                Finding(
                    "copy-image", False, "Glance does not offer the copy-image import method (enabled_import_methods)"
                )
            )
    if strategy == Strategy.LOCATION_SWAP and profile.store_type(to_store) == "file":
        problems.append(
            Finding(
                "locations",
                False,
                f"{to_store} is a file store and Glance refuses to add file:// locations, so location-swap "
                "cannot move images into it: use --strategy copy-image",
            )
        )
    if strategy == Strategy.LOCATION_SWAP and profile.locations_visible is False:
        problems.append(
            Finding(
                "locations",
                False,
                "Glance does not show image locations (show_multiple_locations = False or policy); "
                "location-swap needs them: use --strategy copy-image",
            )
        )
    if strategy == Strategy.COPY_IMAGE and profile.sharing_unseen and not accept_unseen_sharing:
        problems.append(
            Finding(
                "sharing",
                False,
                "Glance hides image locations and refuses GET /v2/images/ID/locations, so whether another image "
                "shares the data a store delete removes cannot be known: a run would refuse to delete. "
                f"{SEE_LOCATIONS}, or accept the risk with --accept-unseen-sharing",
            )
        )
    credentials = _credentials_finding(profile)
    if not credentials.ok:
        problems.append(credentials)
    return problems


def _credentials_finding(profile: CloudProfile) -> Finding:
    """Roles are not judged by name (a policy may grant the rights to another role): without admin, a doubt."""
    if not profile.roles or profile.roles & ADMIN_ROLES:
        return Finding("credentials", True, f"roles {', '.join(sorted(profile.roles)) or 'unknown'}")
    return Finding(
        "credentials",
        False,
        f"the credentials have roles {sorted(profile.roles)}, not admin: Glance's default policy lets only admins "
        "copy images between stores and delete from a store. If this cloud's policy grants those rights to one "
        "of these roles, a run goes ahead (it stops at Glance's first refusal)",
        blocking=False,
    )


def preflight(
    profile: CloudProfile, from_store: str, to_store: str, strategy: Strategy, accept_unseen_sharing: bool = False
) -> None:
    """Refuse, before anything changes, a run that cannot work on this cloud."""
    for problem in assess(profile, from_store, to_store, strategy, accept_unseen_sharing):
        if problem.blocking:
            raise problem.error(problem.detail)
        log.warning("%s", problem.detail)


def report(
    profile: CloudProfile,
    from_store: str | None,
    to_store: str | None,
    spool_dir: Path,
    usage: dict[str, dict[str, int]] | None,
    service: bool = False,
) -> list[Finding]:
    """The `check` command: what Glance offers, and what `run` would do between the two stores. `usage`: the
    project's Keystone unified limits (Glance.usage), asked by `check` only; `service`: a --service-cloud is given."""
    if profile.stores is None:
        stores = Finding(
            "stores",
            True,
            f"single-store Glance (no enabled_backends); backends by URL scheme: {', '.join(sorted(LEGACY_SCHEMES))}",
        )
    else:
        listed = ", ".join(
            f"{s.id} ({s.type or 'type hidden'}{', default' if s.default else ''})" for s in profile.stores
        )
        stores = Finding("stores", True, listed)
    api = profile.api_version
    findings = [
        Finding("glance", True, f"image API v{api[0]}.{api[1]} ({release_of(api)})" if api else release_of(api)),
        stores,
        Finding("import methods", True, ", ".join(profile.import_methods) or "none"),
        Finding(
            "locations",
            not profile.sharing_unseen,
            {
                True: "visible (show_multiple_locations = True): images sharing a data object are found before "
                "any delete",
                False: "hidden: location-swap impossible; "
                + (
                    "images sharing a data object are found through GET /v2/images/ID/locations"
                    + (" (with the --service-cloud token)" if service else "")
                    if profile.locations_api
                    else "images sharing a data object cannot be seen ("
                    + (
                        "this Glance has no GET /v2/images/ID/locations, API 2.17"
                        if api and api < LOCATIONS_API
                        else "GET /v2/images/ID/locations refused us"
                    )
                    + f"): a copy-image run refuses to delete. {SEE_LOCATIONS}, or accept the risk with "
                    "--accept-unseen-sharing"
                ),
                None: "unknown: no image to look at",
            }[profile.locations_visible],
        ),
        _credentials_finding(profile),
        _quota_finding(usage),
    ]
    free = shutil.disk_usage(_existing_parent(spool_dir)).free
    findings.append(
        Finding("spool", True, f"{spool_dir}: {free / 1e9:.1f} GB free (location-swap downloads each image there)")
    )
    if from_store and to_store:
        strategy, why = choose_strategy(profile, from_store)
        problems = [p for p in assess(profile, from_store, to_store, strategy) if p.blocking]  # doubts: above
        findings += problems or [Finding("run --strategy auto", True, f"would use {strategy}, because {why}")]
        for other in Strategy:
            if other != strategy:
                blockers = [p for p in assess(profile, from_store, to_store, other) if p.blocking]
                detail = (
                    "would work too" if not blockers else "would not work: " + "; ".join(b.detail for b in blockers)
                )
                findings.append(Finding(f"--strategy {other}", True, detail))
    return findings


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _quota_finding(usage: dict[str, dict[str, int]] | None) -> Finding:
    if usage is None:
        return Finding("quota", True, "unknown (this Glance has no GET /v2/info/usage)")
    if not usage:
        return Finding("quota", True, "Glance enforces no Keystone unified limits on images")
    shown = ", ".join(f"{name} {u.get('usage')}/{u.get('limit')}" for name, u in sorted(usage.items()))
    return Finding(
        "quota",
        True,
        f"Keystone unified limits are on (this project: {shown}): location-swap's copies count against them "
        "(and copy-image's staging); an image refused for quota fails with kind `quota`",
    )
