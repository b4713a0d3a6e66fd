"""storage/catalog.py: aliases, exposed inputs, prompt building, reloading."""

import copy
import json
import logging
import math
import os
from pathlib import Path

import pytest

from storage import catalog as catalog_mod
from storage.catalog import MAX_STR_LEN, CatalogError, ExposedInput, WorkflowCatalog

REPO_WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"

INVERT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"},
          "_meta": {"title": "Load Image"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]},
          "_meta": {"title": "Invert Image"}},
    "3": {"class_type": "SaveImage",
          "inputs": {"images": ["2", 0], "filename_prefix": "bridge_invert"},
          "_meta": {"title": "Save Image"}},
}

# One input of each type, a node without _meta, a list literal and a link.
MIXED = {
    "3": {"class_type": "KSampler",
          "inputs": {"seed": 42, "cfg": 7.5, "sampler_name": "euler",
                     "model": ["4", 0]},
          "_meta": {"title": "Sampler"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
    "5": {"class_type": "SomeToggle",
          "inputs": {"enabled": True, "sizes": {"__value__": [1, 2]}, "pair": [1, 2]},
          "_meta": {"title": "Toggle"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]},
          "_meta": {"title": "Prompt"}},
}

UI_FORMAT = {
    "id": "0c2a9f4e", "revision": 0, "last_node_id": 2, "last_link_id": 1,
    "nodes": [{"id": 1, "type": "LoadImage", "widgets_values": ["a.png", "image"]},
              {"id": 2, "type": "SaveImage", "widgets_values": ["x"]}],
    "links": [[1, 1, 0, 2, 0, "IMAGE"]], "version": 0.4,
}


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def touch_later(path: Path) -> None:
    """Make an edit visible even on a file system with coarse timestamps."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


@pytest.fixture
def wdir(tmp_path):
    d = tmp_path / "workflows"
    d.mkdir()
    return d


def make_catalog(wdir: Path, aliases, files: dict, **kw) -> WorkflowCatalog:
    for name, graph in files.items():
        path = wdir / name
        if isinstance(graph, str):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(graph)
        else:
            write_json(path, graph)
    write_json(wdir / "aliases.json", aliases)
    kw.setdefault("check_interval", 0)
    return WorkflowCatalog(wdir, wdir / "aliases.json", **kw)


# -- alias entries -------------------------------------------------------------

def test_string_entry_and_object_entry(wdir):
    cat = make_catalog(wdir, {
        "plain": "inv.json",
        "full": {"file": "inv.json", "inputs": ["1/image"], "description": "inverts",
                 "backends": ["gpu1:8188", "gpu2:8188"]},
    }, {"inv.json": INVERT})
    assert cat.aliases() == ["plain", "full"]
    assert cat.load_errors() == {}

    full = cat.get("full")
    assert full.alias == "full"
    assert full.file == "inv.json"
    assert full.description == "inverts"
    assert full.backends == ["gpu1:8188", "gpu2:8188"]
    assert list(full.inputs) == ["1/image"]
    assert full.class_types == frozenset({"LoadImage", "ImageInvert", "SaveImage"})
    assert full.graph == INVERT

    plain = cat.get("plain")
    assert plain.description == ""
    assert plain.backends is None


def test_aliases_keep_alias_file_order(wdir):
    names = ["zeta", "alpha", "mid"]
    cat = make_catalog(wdir, {n: {"file": "inv.json", "inputs": ["1/image"]} for n in names},
                       {"inv.json": INVERT})
    assert cat.aliases() == names


def test_workflow_in_subfolder(wdir):
    cat = make_catalog(wdir, {"sub": {"file": "team/inv.json", "inputs": ["1/image"]}},
                       {"team/inv.json": INVERT})
    assert cat.get("sub").file == "team/inv.json"


@pytest.mark.parametrize("entry, fragment", [
    (5, "file name or an object"),
    ({"inputs": ["1/image"]}, "\"file\""),
    ({"file": "inv.json", "inputs": "1/image"}, "\"inputs\""),
    ({"file": "inv.json", "backends": "gpu1:8188"}, "\"backends\""),
    ({"file": "inv.json", "description": 3}, "\"description\""),
    ({"file": "inv.json", "input": ["1/image"]}, "unknown key 'input'"),
])
def test_bad_entry_is_that_alias_load_error(wdir, entry, fragment):
    cat = make_catalog(wdir, {"bad": entry, "good": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT})
    assert cat.aliases() == ["good"]
    assert fragment in cat.load_errors()["bad"]
    with pytest.raises(CatalogError, match="workflow 'bad' is unavailable"):
        cat.get("bad")


def test_files_with_byte_order_mark_load(wdir):
    cat = make_catalog(wdir, {}, {"inv.json": "\ufeff" + json.dumps(INVERT)})
    (wdir / "aliases.json").write_text("\ufeff" + json.dumps({"i": "inv.json"}))
    touch_later(wdir / "aliases.json")
    assert cat.aliases() == ["i"]


def test_comment_keys_allowed_in_entry(wdir):
    cat = make_catalog(wdir, {"a": {"file": "inv.json", "inputs": ["1/image"], "_note": "x"}},
                       {"inv.json": INVERT})
    assert cat.aliases() == ["a"]


def test_unknown_alias_lists_available(wdir):
    cat = make_catalog(wdir, {"a": {"file": "inv.json", "inputs": ["1/image"]},
                              "b": {"file": "inv.json", "inputs": ["1/image"]},
                              "broken": "missing.json"},
                       {"inv.json": INVERT})
    with pytest.raises(CatalogError) as exc:
        cat.get("x")
    assert str(exc.value) == "unknown workflow 'x'; available: a, b"


def test_non_string_alias_refused(wdir):
    cat = make_catalog(wdir, {"a": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT})
    with pytest.raises(CatalogError, match="must be a string"):
        cat.get(["a"])


def test_missing_workflow_file_is_load_error(wdir):
    cat = make_catalog(wdir, {"gone": "nowhere.json"}, {})
    assert cat.aliases() == []
    assert cat.load_errors() == {"gone": "workflow file 'nowhere.json' not found"}


# -- exposed inputs ------------------------------------------------------------

def test_inputs_list_wins_over_apiinput(wdir):
    graph = copy.deepcopy(MIXED)
    graph["6"]["_meta"]["apiinput"] = "text"
    cat = make_catalog(wdir, {"m": {"file": "m.json", "inputs": ["3/seed", "3/cfg"]}},
                       {"m.json": graph})
    assert list(cat.get("m").inputs) == ["3/seed", "3/cfg"]


def test_apiinput_exposes_named_inputs(wdir, caplog):
    graph = copy.deepcopy(MIXED)
    graph["3"]["_meta"]["apiinput"] = "seed, cfg"
    graph["6"]["_meta"]["apiinput"] = "text"
    with caplog.at_level(logging.WARNING, logger="bridge.catalog"):
        cat = make_catalog(wdir, {"m": "m.json"}, {"m.json": graph})
    assert list(cat.get("m").inputs) == ["3/seed", "3/cfg", "6/text"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_apiinput_naming_missing_input_is_load_error(wdir):
    graph = copy.deepcopy(MIXED)
    graph["6"]["_meta"]["apiinput"] = "text,txt"
    cat = make_catalog(wdir, {"m": "m.json"}, {"m.json": graph})
    assert "'6/txt'" in cat.load_errors()["m"]


def test_all_literals_exposed_with_warning(wdir, caplog):
    with caplog.at_level(logging.WARNING, logger="bridge.catalog"):
        cat = make_catalog(wdir, {"m": "m.json"}, {"m.json": MIXED})
    wf = cat.get("m")
    # links ("3/model", "6/clip") and list/dict literals ("5/pair", "5/sizes") are left out
    assert list(wf.inputs) == ["3/seed", "3/cfg", "3/sampler_name", "4/ckpt_name",
                               "5/enabled", "6/text"]
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "bridge.catalog"]
    assert len(warnings) == 1
    assert "'m'" in warnings[0].getMessage()
    assert "all 6 literal inputs" in warnings[0].getMessage()


def test_explicit_empty_inputs_list_exposes_nothing(wdir, caplog):
    with caplog.at_level(logging.WARNING, logger="bridge.catalog"):
        cat = make_catalog(wdir, {"m": {"file": "m.json", "inputs": []}}, {"m.json": MIXED})
    assert cat.get("m").inputs == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_info_shape_types_and_title_fallback(wdir):
    cat = make_catalog(wdir, {"m": {"file": "m.json", "inputs": [
        "6/text", "3/seed", "3/cfg", "5/enabled", "4/ckpt_name"]}}, {"m.json": MIXED})
    assert cat.get("m").info() == {
        "6/text": {"type": "str", "title": "Prompt", "class": "CLIPTextEncode",
                   "default": "a cat"},
        "3/seed": {"type": "int", "title": "Sampler", "class": "KSampler", "default": 42},
        "3/cfg": {"type": "float", "title": "Sampler", "class": "KSampler", "default": 7.5},
        "5/enabled": {"type": "bool", "title": "Toggle", "class": "SomeToggle",
                      "default": True},
        # node 4 has no _meta: the class stands in for the title
        "4/ckpt_name": {"type": "str", "title": "CheckpointLoaderSimple",
                        "class": "CheckpointLoaderSimple", "default": "m.safetensors"},
    }


def test_exposed_input_fields(wdir):
    cat = make_catalog(wdir, {"i": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT})
    assert cat.get("i").inputs["1/image"] == ExposedInput(
        key="1/image", node_id="1", name="image", type="str", title="Load Image",
        class_type="LoadImage", default="example.png", is_file=True)


@pytest.mark.parametrize("key, fragment", [
    ("6/txt", "'6/txt' not found"),        # no such input
    ("9/text", "'9/text' not found"),      # no such node
    ("6/clip", "'6/clip' is a link"),      # link, not a value
    ("5/pair", "'5/pair' cannot be exposed"),    # list literal
    ("5/sizes", "'5/sizes' cannot be exposed"),  # wrapped list (dict)
    ("seed", "'seed' must look like"),
])
def test_unexposable_input_is_load_error_naming_it(wdir, key, fragment):
    cat = make_catalog(wdir, {"m": {"file": "m.json", "inputs": ["3/seed", key]},
                              "ok": {"file": "m.json", "inputs": ["3/seed"]}},
                       {"m.json": MIXED})
    assert fragment in cat.load_errors()["m"]
    assert cat.aliases() == ["ok"]


# -- file formats ----------------------------------------------------------------

def test_ui_format_refused_with_export_hint(wdir):
    cat = make_catalog(wdir, {"ui": "ui.json"}, {"ui.json": UI_FORMAT})
    reason = cat.load_errors()["ui"]
    assert "UI-format" in reason
    assert "Save (API Format)" in reason
    with pytest.raises(CatalogError, match=r"Save \(API Format\)"):
        cat.get("ui")


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "invalid JSON"),
    ('{"1": {"class_type": "X", "inputs": {"v": NaN}}}', "invalid JSON"),
    ("[1, 2]", "not an API-format workflow"),
    ("{}", "not an API-format workflow"),
    ('{"1": {"inputs": {}}}', "has no class_type"),
    ('{"1": {"class_type": "X", "inputs": [1]}}', "\"inputs\""),
])
def test_malformed_workflow_is_load_error(wdir, content, fragment):
    cat = make_catalog(wdir, {"w": "w.json"}, {"w.json": content})
    assert fragment in cat.load_errors()["w"]
    assert cat.aliases() == []


@pytest.mark.parametrize("name", ["../outside.json", "/etc/passwd", "sub/../../outside.json",
                                  "..\\outside.json"])
def test_path_escape_refused(wdir, name):
    write_json(wdir.parent / "outside.json", INVERT)
    cat = make_catalog(wdir, {"esc": name}, {})
    assert "inside the workflow directory" in cat.load_errors()["esc"]
    assert cat.aliases() == []


def test_dotdot_and_absolute_refused_even_when_inside(wdir):
    # Plain rule for admins: no ".." and no absolute paths, wherever they would land.
    cat = make_catalog(wdir, {"dots": "team/../inv.json", "abs": str(wdir / "inv.json"),
                              "ok": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT, "team/x.json": INVERT})
    errors = cat.load_errors()
    assert "inside the workflow directory" in errors["dots"]
    assert "inside the workflow directory" in errors["abs"]
    assert cat.aliases() == ["ok"]


def test_symlink_out_of_dir_refused(wdir):
    write_json(wdir.parent / "outside.json", INVERT)
    (wdir / "link.json").symlink_to(wdir.parent / "outside.json")
    cat = make_catalog(wdir, {"esc": "link.json"}, {})
    assert "inside the workflow directory" in cat.load_errors()["esc"]


def test_broken_file_does_not_hide_others(wdir):
    cat = make_catalog(wdir, {"good": {"file": "inv.json", "inputs": ["1/image"]},
                              "bad": "bad.json",
                              "also-good": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT, "bad.json": "{oops"})
    assert cat.aliases() == ["good", "also-good"]
    assert list(cat.load_errors()) == ["bad"]
    assert cat.get("good").alias == "good"


def test_missing_alias_file_serves_nothing(wdir, caplog):
    with caplog.at_level(logging.ERROR, logger="bridge.catalog"):
        cat = WorkflowCatalog(wdir, wdir / "aliases.json", check_interval=0)
    assert cat.aliases() == []
    assert cat.load_errors() == {"aliases.json": "alias file 'aliases.json' not found"}
    assert any("aliases.json" in r.getMessage() for r in caplog.records)
    with pytest.raises(CatalogError, match="available: \\(none\\)"):
        cat.get("anything")


@pytest.mark.parametrize("content, fragment", [
    ("{broken", "invalid JSON"),
    ('["a", "b"]', "must be a JSON object"),
])
def test_unusable_alias_file_serves_nothing(wdir, content, fragment):
    write_json(wdir / "inv.json", INVERT)
    (wdir / "aliases.json").write_text(content)
    cat = WorkflowCatalog(wdir, wdir / "aliases.json", check_interval=0)
    assert cat.aliases() == []
    assert fragment in cat.load_errors()["aliases.json"]


# -- build_prompt ------------------------------------------------------------------

@pytest.fixture
def mixed(wdir):
    cat = make_catalog(wdir, {"m": {"file": "m.json", "inputs": [
        "6/text", "3/seed", "3/cfg", "5/enabled"]}}, {"m.json": MIXED})
    return cat.get("m")


def test_build_prompt_applies_values_keeps_defaults(mixed):
    prompt, files = mixed.build_prompt({"6/text": "a dog", "3/seed": 7})
    assert prompt["6"]["inputs"] == {"text": "a dog", "clip": ["4", 1]}
    assert prompt["3"]["inputs"]["seed"] == 7
    assert prompt["3"]["inputs"]["cfg"] == 7.5          # not given: default
    assert prompt["5"]["inputs"]["enabled"] is True
    assert prompt["4"] == MIXED["4"]
    assert files == {}


def test_build_prompt_does_not_mutate_graph(mixed):
    before = copy.deepcopy(mixed.graph)
    prompt, _ = mixed.build_prompt({"6/text": "changed", "5/enabled": False})
    prompt["3"]["inputs"]["model"].append("x")          # deep copy, not shared lists
    assert mixed.graph == before
    again, _ = mixed.build_prompt({})
    assert again == before


def test_build_prompt_unknown_key_lists_allowed(mixed):
    with pytest.raises(CatalogError) as exc:
        mixed.build_prompt({"6/text": "ok", "7/txt": "x"})
    assert str(exc.value) == ("unknown input '7/txt' for workflow 'm'; "
                              "allowed: 6/text, 3/seed, 3/cfg, 5/enabled")


def test_build_prompt_link_input_not_settable(mixed):
    with pytest.raises(CatalogError, match="unknown input '3/model'"):
        mixed.build_prompt({"3/model": ["9", 0]})


def test_int_accepted_for_float(mixed):
    prompt, _ = mixed.build_prompt({"3/cfg": 6})
    assert prompt["3"]["inputs"]["cfg"] == 6.0
    assert isinstance(prompt["3"]["inputs"]["cfg"], float)


@pytest.mark.parametrize("key, value, message", [
    ("3/seed", "7", "input '3/seed' must be int, got str"),
    ("3/seed", True, "input '3/seed' must be int, got bool"),
    ("3/seed", 7.0, "input '3/seed' must be int, got float"),
    ("3/seed", None, "input '3/seed' must be int, got null"),
    ("3/cfg", False, "input '3/cfg' must be float, got bool"),
    ("3/cfg", "1.5", "input '3/cfg' must be float, got str"),
    ("5/enabled", 1, "input '5/enabled' must be bool, got int"),
    ("6/text", 5, "input '6/text' must be str, got int"),
    ("6/text", ["a"], "input '6/text' must be str, got list"),
    ("6/text", {"a": 1}, "input '6/text' must be str, got object"),
])
def test_wrong_type_refused(mixed, key, value, message):
    with pytest.raises(CatalogError) as exc:
        mixed.build_prompt({key: value})
    assert str(exc.value) == message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float_refused(mixed, value):
    with pytest.raises(CatalogError, match="'3/cfg' must be a finite number"):
        mixed.build_prompt({"3/cfg": value})


def test_huge_int_for_float_refused(mixed):
    with pytest.raises(CatalogError, match="'3/cfg' is out of range"):
        mixed.build_prompt({"3/cfg": 10 ** 400})


def test_string_length_cap(mixed):
    prompt, _ = mixed.build_prompt({"6/text": "x" * MAX_STR_LEN})
    assert len(prompt["6"]["inputs"]["text"]) == MAX_STR_LEN
    with pytest.raises(CatalogError, match="'6/text' is too long"):
        mixed.build_prompt({"6/text": "x" * (MAX_STR_LEN + 1)})


def test_values_must_be_object(mixed):
    with pytest.raises(CatalogError, match="JSON object"):
        mixed.build_prompt(["6/text"])


# -- file inputs -------------------------------------------------------------------

FILE_NODES = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
    "2": {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "alpha"}},
    "3": {"class_type": "LoadImageOutput", "inputs": {"image": "o.png"}},
    "4": {"class_type": "LoadVideo", "inputs": {"file": "v.mp4"}},
    "5": {"class_type": "LoadAudio", "inputs": {"audio": "s.wav"}},
    "6": {"class_type": "VHS_LoadVideo", "inputs": {"video": "v.webm", "frame_load_cap": 0}},
    "7": {"class_type": "VHS_LoadAudioUpload", "inputs": {"audio": "s.mp3"}},
    "8": {"class_type": "VHS_LoadImagePath", "inputs": {"image": "/data/x.png"}},
    "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "image.png"}},
}
FILE_KEYS = ["1/image", "2/image", "3/image", "4/file", "5/audio", "6/video", "7/audio"]


def test_file_input_detection(wdir):
    cat = make_catalog(wdir, {"f": "f.json"}, {"f.json": FILE_NODES})
    wf = cat.get("f")
    assert sorted(k for k, i in wf.inputs.items() if i.is_file) == sorted(FILE_KEYS)
    info = wf.info()
    for key in FILE_KEYS:
        assert info[key]["upload"] is True
    for key in ("2/channel", "6/frame_load_cap", "8/image", "9/text"):
        assert "upload" not in info[key]


def test_build_prompt_reports_given_file_inputs(wdir):
    cat = make_catalog(wdir, {"f": "f.json"}, {"f.json": FILE_NODES})
    wf = cat.get("f")
    prompt, files = wf.build_prompt({"1/image": "up1.png", "4/file": "clip.mp4",
                                     "9/text": "not a file", "2/channel": "red"})
    assert files == {"1/image": "up1.png", "4/file": "clip.mp4"}
    assert prompt["1"]["inputs"]["image"] == "up1.png"
    assert prompt["3"]["inputs"]["image"] == "o.png"     # default, not reported
    with pytest.raises(CatalogError, match="'1/image' must name an uploaded file"):
        wf.build_prompt({"1/image": ""})


# -- reloading -----------------------------------------------------------------------

def test_reload_after_workflow_edit(wdir):
    cat = make_catalog(wdir, {"i": {"file": "inv.json", "inputs": ["3/filename_prefix"]}},
                       {"inv.json": INVERT})
    first = cat.get("i")
    assert first.inputs["3/filename_prefix"].default == "bridge_invert"

    edited = copy.deepcopy(INVERT)
    edited["3"]["inputs"]["filename_prefix"] = "renamed"
    write_json(wdir / "inv.json", edited)
    touch_later(wdir / "inv.json")
    second = cat.get("i")
    assert second.inputs["3/filename_prefix"].default == "renamed"
    assert first.inputs["3/filename_prefix"].default == "bridge_invert"  # old snapshot intact


def test_unchanged_workflow_is_not_reloaded(wdir):
    cat = make_catalog(wdir, {"i": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT})
    assert cat.get("i") is cat.get("i")


def test_reload_after_alias_file_edit(wdir):
    cat = make_catalog(wdir, {"a": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT, "m.json": MIXED})
    assert cat.aliases() == ["a"]
    write_json(wdir / "aliases.json", {
        "b": {"file": "m.json", "inputs": ["3/seed"]},
        "a": {"file": "inv.json", "inputs": ["1/image", "3/filename_prefix"]},
    })
    touch_later(wdir / "aliases.json")
    assert cat.aliases() == ["b", "a"]
    assert list(cat.get("a").inputs) == ["1/image", "3/filename_prefix"]
    write_json(wdir / "aliases.json", {"b": {"file": "m.json", "inputs": ["3/seed"]}})
    touch_later(wdir / "aliases.json")
    assert cat.aliases() == ["b"]
    with pytest.raises(CatalogError, match="unknown workflow 'a'; available: b"):
        cat.get("a")


def test_added_workflow_file_is_picked_up(wdir):
    cat = make_catalog(wdir, {"later": "later.json"}, {})
    assert cat.aliases() == []
    write_json(wdir / "later.json", {**INVERT, "1": {**INVERT["1"], "_meta": {
        "title": "Load Image", "apiinput": "image"}}})
    assert cat.aliases() == ["later"]
    assert cat.load_errors() == {}


def test_bad_edit_keeps_others_and_recovers(wdir):
    cat = make_catalog(wdir, {"i": {"file": "inv.json", "inputs": ["1/image"]},
                              "m": {"file": "m.json", "inputs": ["3/seed"]}},
                       {"inv.json": INVERT, "m.json": MIXED})
    good = cat.get("m")
    (wdir / "m.json").write_text('{"3": ')
    touch_later(wdir / "m.json")
    assert cat.aliases() == ["i", "m"]          # the last good version keeps serving
    assert cat.get("m") is good
    assert cat.load_errors() == {}               # nothing is unavailable
    [broken] = cat.broken()
    assert broken["file"] == "m.json" and broken["aliases"] == ["m"]
    assert "invalid JSON" in broken["error"]
    edited = copy.deepcopy(MIXED)
    edited["3"]["inputs"]["seed"] = 7
    write_json(wdir / "m.json", edited)
    touch_later(wdir / "m.json")
    assert cat.get("m").inputs["3/seed"].default == 7
    assert cat.broken() == []


def test_alias_file_appearing_and_breaking(wdir):
    write_json(wdir / "inv.json", INVERT)
    cat = WorkflowCatalog(wdir, wdir / "aliases.json", check_interval=0)
    assert cat.aliases() == []
    write_json(wdir / "aliases.json", {"i": {"file": "inv.json", "inputs": ["1/image"]}})
    assert cat.aliases() == ["i"]
    assert cat.broken() == []
    (wdir / "aliases.json").write_text("{")
    touch_later(wdir / "aliases.json")
    assert cat.aliases() == ["i"]                # the last good alias table keeps serving
    assert cat.load_errors() == {}
    [broken] = cat.broken()
    assert broken["file"] == "aliases.json" and "invalid JSON" in broken["error"]


# -- last good version during live edits ------------------------------------------------

@pytest.fixture
def wall(monkeypatch):
    """The wall clock behind "broken since", moved by hand."""
    clock = [1_700_000_000.0]
    monkeypatch.setattr(catalog_mod, "_wall", lambda: clock[0])
    return clock


@pytest.mark.parametrize("breakage, fragment", [
    ("{\"1\": ", "invalid JSON"),
    (json.dumps(UI_FORMAT), "UI-format"),
    (b"\xff\xfe", "not UTF-8"),
    (None, "not found"),                         # deleted (or mid-rename by an editor)
    (json.dumps({"9": {"class_type": "X", "inputs": {}}}), "exposed input '1/image' not found"),
])
def test_broken_workflow_file_keeps_last_good_version(wdir, wall, caplog, breakage, fragment):
    cat = make_catalog(wdir, {"i": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT})
    good = cat.get("i")
    path = wdir / "inv.json"
    with caplog.at_level(logging.ERROR, logger="bridge.catalog"):
        if breakage is None:
            path.unlink()
        else:
            path.write_bytes(breakage.encode() if isinstance(breakage, str) else breakage)
            touch_later(path)
        assert cat.get("i") is good
        assert cat.aliases() == ["i"]
    [broken] = cat.broken()
    assert broken["file"] == "inv.json" and broken["since"] == wall[0]
    assert fragment in broken["error"] and broken["aliases"] == ["i"]
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and "last good" in logged[0] and fragment in logged[0]

    wall[0] += 60
    write_json(path, {**INVERT, "3": {**INVERT["3"], "_meta": {"title": "Renamed"}}})
    touch_later(path)
    assert cat.get("i") is not good
    assert cat.get("i").graph["3"]["_meta"]["title"] == "Renamed"
    assert cat.broken() == []


def test_broken_since_is_the_first_failure(wdir, wall):
    cat = make_catalog(wdir, {"i": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT})
    (wdir / "inv.json").write_text("{")
    touch_later(wdir / "inv.json")
    first = wall[0]
    assert cat.broken()[0]["since"] == first
    wall[0] += 30
    (wdir / "inv.json").write_text(json.dumps(UI_FORMAT))
    touch_later(wdir / "inv.json")
    [broken] = cat.broken()
    assert broken["since"] == first and "UI-format" in broken["error"]   # the latest reason


def test_broken_alias_file_keeps_last_good_table(wdir, wall, caplog):
    cat = make_catalog(wdir, {"i": {"file": "inv.json", "inputs": ["1/image"]},
                              "m": {"file": "m.json", "inputs": ["3/seed"]}},
                       {"inv.json": INVERT, "m.json": MIXED})
    alias_file = wdir / "aliases.json"
    with caplog.at_level(logging.ERROR, logger="bridge.catalog"):
        alias_file.write_text('{"i": {"file": "inv.json", "inputs": ["1/ima')
        touch_later(alias_file)
        assert cat.aliases() == ["i", "m"]
    assert any("last good" in r.getMessage() for r in caplog.records)
    assert cat.broken() == [{"file": "aliases.json", "since": wall[0],
                             "error": cat.broken()[0]["error"], "aliases": []}]
    assert "invalid JSON" in cat.broken()[0]["error"]

    # Workflow files still reload while the alias table is the last good one.
    edited = copy.deepcopy(MIXED)
    edited["3"]["inputs"]["seed"] = 9
    write_json(wdir / "m.json", edited)
    touch_later(wdir / "m.json")
    assert cat.get("m").inputs["3/seed"].default == 9

    alias_file.unlink()                          # gone: still the last good table
    assert cat.aliases() == ["i", "m"]
    assert "not found" in cat.broken()[0]["error"]

    write_json(alias_file, {"m": {"file": "m.json", "inputs": ["3/seed"]}})
    assert cat.aliases() == ["m"]
    assert cat.broken() == []


def test_broken_alias_entry_keeps_that_alias_last_good_version(wdir, wall):
    cat = make_catalog(wdir, {"i": {"file": "inv.json", "inputs": ["1/image"]},
                              "j": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT})
    good = cat.get("i")
    write_json(wdir / "aliases.json", {"i": {"file": "inv.json", "inputs": "1/image"},
                                       "j": {"file": "inv.json", "inputs": ["1/image"]}})
    touch_later(wdir / "aliases.json")
    assert cat.get("i") is good
    [broken] = cat.broken()
    assert broken["file"] == "aliases.json" and broken["aliases"] == ["i"]
    assert "\"inputs\"" in broken["error"]


def test_shared_broken_file_is_one_entry(wdir, wall):
    cat = make_catalog(wdir, {"a": {"file": "inv.json", "inputs": ["1/image"]},
                              "b": {"file": "inv.json", "inputs": ["3/filename_prefix"]}},
                       {"inv.json": INVERT})
    (wdir / "inv.json").write_text("[")
    touch_later(wdir / "inv.json")
    assert cat.aliases() == ["a", "b"]
    [broken] = cat.broken()
    assert broken["file"] == "inv.json" and broken["aliases"] == ["a", "b"]


def test_broken_at_start_up_is_unavailable_and_listed(wdir, wall):
    cat = make_catalog(wdir, {"bad": "bad.json", "good": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT, "bad.json": "{oops"})
    assert cat.aliases() == ["good"]
    assert "invalid JSON" in cat.load_errors()["bad"]
    with pytest.raises(CatalogError, match="workflow 'bad' is unavailable"):
        cat.get("bad")
    [broken] = cat.broken()
    assert broken["file"] == "bad.json" and broken["aliases"] == ["bad"]
    write_json(wdir / "bad.json", INVERT)
    touch_later(wdir / "bad.json")
    assert cat.aliases() == ["bad", "good"] and cat.broken() == []


def test_unusable_alias_file_at_start_up_is_listed(wdir, wall):
    (wdir / "aliases.json").write_text("{")
    cat = WorkflowCatalog(wdir, wdir / "aliases.json", check_interval=0)
    assert cat.aliases() == []
    assert list(cat.load_errors()) == ["aliases.json"]
    assert [b["file"] for b in cat.broken()] == ["aliases.json"]


def test_check_interval_limits_stat_calls(wdir, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(catalog_mod, "_now", lambda: clock[0])
    cat = make_catalog(wdir, {"a": {"file": "inv.json", "inputs": ["1/image"]}},
                       {"inv.json": INVERT}, check_interval=5.0)
    write_json(wdir / "aliases.json", {"b": {"file": "inv.json", "inputs": ["1/image"]}})
    touch_later(wdir / "aliases.json")
    clock[0] += 4.9
    assert cat.aliases() == ["a"]       # within the interval: not looked at
    clock[0] += 0.2
    assert cat.aliases() == ["b"]


# -- shipped examples --------------------------------------------------------------

def test_shipped_examples_load_cleanly(caplog):
    with caplog.at_level(logging.WARNING, logger="bridge.catalog"):
        cat = WorkflowCatalog(REPO_WORKFLOWS, REPO_WORKFLOWS / "aliases.json")
    assert cat.load_errors() == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert cat.aliases() == ["invert", "blank-image", "blur-scale", "slow-progress",
                             "text-to-image", "lora-image"]
    expected = {
        "invert": {"1/image": "str"},
        "blank-image": {"1/width": "int", "1/height": "int", "1/color": "int"},
        "blur-scale": {"1/image": "str", "2/width": "int", "2/height": "int",
                       "3/blur_radius": "int"},
        "slow-progress": {"1/image": "str", "2/steps": "int"},
        "text-to-image": {"4/ckpt_name": "str", "6/text": "str", "7/text": "str", "3/seed": "int",
                          "3/steps": "int", "5/width": "int", "5/height": "int"},
        "lora-image": {"4/ckpt_name": "str", "10/lora_name": "str", "10/strength_model": "float",
                       "10/strength_clip": "float", "6/text": "str", "3/seed": "int", "3/steps": "int",
                       "5/width": "int", "5/height": "int"},
    }
    for alias, types in expected.items():
        wf = cat.get(alias)
        assert {k: i.type for k, i in wf.inputs.items()} == types, alias
        for key, inp in wf.inputs.items():
            assert inp.title == wf.graph[inp.node_id]["_meta"]["title"]
            assert inp.is_file == (inp.class_type == "LoadImage"), key
        assert all("title" in node["_meta"] for node in wf.graph.values()), alias
        prompt, _ = wf.build_prompt({})
        assert prompt == wf.graph


def test_shipped_example_image_is_png():
    data = (REPO_WORKFLOWS / "example.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    for name in ("invert.json", "blur-scale.json", "slow.json"):
        graph = json.loads((REPO_WORKFLOWS / name).read_text())
        assert graph["1"]["inputs"]["image"] == "example.png"
