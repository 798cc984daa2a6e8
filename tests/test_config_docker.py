"""The shipped Gadgetron chains and the Docker files, checked statically (neither Gadgetron
nor Docker can run here)."""
import importlib
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gadgets.server import chain_properties
from gadgets.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
CHAINS = sorted((ROOT / "config").glob("*.xml"))


def test_three_chains_are_shipped():
    assert {p.name for p in CHAINS} == {"ddugm_cine_execute.xml", "ddugm_cine_connect.xml", "ddugm_cine_acquisitions.xml"}


@pytest.mark.parametrize("path", CHAINS, ids=lambda p: p.name)
def test_chain_is_a_valid_v2_configuration_with_our_node(path):
    root = ET.parse(path).getroot()
    assert root.tag == "configuration" and root.findtext("version") == "2"
    externals = root.findall("./stream/external")
    assert len(externals) == 1
    ext = externals[0]
    execute, connect = ext.find("execute"), ext.find("connect")
    assert (execute is None) != (connect is None)
    if execute is not None:
        assert execute.get("type") == "python"
        module = importlib.import_module(execute.get("name"))
        assert callable(getattr(module, execute.get("target")))
    else:
        assert connect.get("port") == "18000"  # ddugm serve's default
        assert connect.get("address") == "127.0.0.1"  # no resolution of "localhost" (which may give ::1 first)
    load_settings(chain_properties(path.read_bytes()))  # every property is a valid setting
    names = [g.findtext("classname") for g in root.iter("gadget")]
    if path.name != "ddugm_cine_acquisitions.xml":  # the buffered chains
        assert names.index("BucketToBufferGadget") < names.index("ImageArraySplitGadget")
        props = {p.get("name"): p.get("value") for g in root.iter("gadget") if g.findtext("classname") == "BucketToBufferGadget"
                 for p in g.iter("property")}
        assert props["N_dimension"] == "phase" and props["split_slices"] == "true"


def test_dockerfile_builds_on_the_gadgetron_runtime_and_installs_this_package():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG GADGETRON_IMAGE=(\S+)\nFROM \$\{GADGETRON_IMAGE\}$", text, re.M)
    assert base, "the base image is an ARG used by the only FROM"
    # a release tag (or a digest), never a moving tag
    assert re.fullmatch(r"ghcr\.io/gadgetron/gadgetron/ubuntu22\.04_rt_cuda(:\d+\.\d+\.\d+|@sha256:[0-9a-f]{64})",
                        base.group(1)), base.group(1)
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)", text, re.M)
    for src in copied:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    assert "pip install" in text and "share/gadgetron/config" in text
    assert "gadgets.guard.active()" in text  # the execute-style start-up guard is checked at build time
    for chain in CHAINS:
        assert chain.name in text or "config/*.xml" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "runs" in ignore or "runs/" in ignore
