"""Provisioning: put the pFedSAM site policy (privacy.json, authorization.json) into every kit.

``nvflare provision`` writes only FLARE's defaults (no privacy policy; project_admin may do
anything, shell commands included). ``SitePolicyBuilder`` (a builder in ``project.yml``, after
StaticFileBuilder) copies ``site_policy/privacy.json`` into each client kit's ``local/`` and
``site_policy/authorization.json`` into the server's and every client's ``local/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from nvflare.lighter.spec import Builder

POLICY_DIR = Path(__file__).resolve().parent / "site_policy"
PRIVACY_FILE = POLICY_DIR / "privacy.json"
AUTHORIZATION_FILE = POLICY_DIR / "authorization.json"


def install_site_policy(local_dir: str | Path, client: bool = True) -> list[Path]:
    """Copy the policy files into a kit's ``local/`` folder; returns the files written.

    Arguments:
      local_dir: ``<kit>/local`` of one participant.
      client: also write ``privacy.json`` (the server needs only ``authorization.json``).
    """
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    written = [Path(shutil.copyfile(AUTHORIZATION_FILE, local / "authorization.json"))]
    if client:
        written.append(Path(shutil.copyfile(PRIVACY_FILE, local / "privacy.json")))
    return written


class SitePolicyBuilder(Builder):
    """Writes the pFedSAM privacy and authorization policy into the provisioned kits."""

    def build(self, project, ctx) -> None:
        server = project.get_server()
        if server is not None:
            install_site_policy(ctx.get_local_dir(server), client=False)
        for client in project.get_clients():
            install_site_policy(ctx.get_local_dir(client), client=True)
