"""Hostile inputs and injected faults: odd label files, odd images, non-finite scores,
odd test-image names, a full disk while writing predictions or checkpoints, damaged
checkpoints. Each test states the behaviour it expects."""

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

import MS_COCO
import MS_COCO_test
from conftest import listing

UserError = MS_COCO.UserError
N = MS_COCO.NUM_CLASSES
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZE = 24  # decode size used throughout: small, and not a divisor of most inputs


# ================================================================ label files
SOURCE = "labels/train/chat noir é.cls"

# pieces that are close to valid, so random joins reach every branch of the parser
LABEL_PIECES = st.sampled_from(
    ["0", "5", "79", "80", "-1", "+3", "-0", "007", "1234567", "3.0", "1e3", "0x10", " ", "\t",
     "\n", "\r\n", "\r", "\ufeff", "\x00", "\x0b", "\x85", "\u2028", "٣", "𝟓", "²", "five", "#"])


def check_parse_outcome(data):
    try:
        ids = MS_COCO.parse_label_text(data, SOURCE)
    except UserError as exc:
        assert SOURCE in str(exc)
        return None
    assert isinstance(ids, list)                  # empty: an image with no object
    assert all(type(i) is int and 0 <= i < N for i in ids)
    assert ids == sorted(set(ids))
    return ids


@FAST
@given(st.binary(max_size=300))
def test_parse_label_arbitrary_bytes_returns_ids_or_user_error(data):
    check_parse_outcome(data)


@FAST
@given(st.one_of(st.text(max_size=200), st.lists(LABEL_PIECES, max_size=40).map("".join)))
def test_parse_label_arbitrary_text_returns_ids_or_user_error(text):
    check_parse_outcome(text)
    check_parse_outcome(text.encode("utf-8", "surrogatepass"))


@st.composite
def rendered_labels(draw):
    """Valid ids rendered the way hand-edited or Windows-made files look."""
    ids = draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=25))
    lines = []
    for i in ids:
        for _ in range(draw(st.integers(0, 2))):                       # blank lines
            lines.append(draw(st.sampled_from(["", " ", "\t", "  \t "])))
        digits = str(i).zfill(draw(st.integers(1, 6)))                   # leading zeros, still <= 6 digits
        lines.append(draw(st.sampled_from(["", " ", "\t"])) + digits + draw(st.sampled_from(["", " ", "  ", "\t"])))
    ends = [draw(st.sampled_from(["\n", "\r\n"])) for _ in lines]
    text = "".join(line + end for line, end in zip(lines, ends))
    if draw(st.booleans()):
        text = text.rstrip("\r\n")                                      # no final newline
    text = "\ufeff" * draw(st.integers(0, 2)) + text                    # BOM(s)
    as_bytes = draw(st.booleans())
    return ids, text.encode("utf-8") if as_bytes else text


@FAST
@given(rendered_labels())
def test_parse_label_valid_ids_in_any_rendering(case):
    ids, data = case
    assert MS_COCO.parse_label_text(data, SOURCE) == sorted(set(ids))


@pytest.mark.parametrize("data", [
    "80", "81\n", "-1", "10" * 15, str(10 ** 30), "999999", "1000000", "1e3", "3.0", "0x10", "five",
    "3 4", "3,4", "1\n2\n80\n", b"\xff\xfe5\x00\n\x00",     # (an empty file is an image with no object)
    "5\n".encode("utf-16"), b"\x89PNG\r\n\x1a\n\x00\x00", b"5\n\xc3\x28",
])
def test_parse_label_rejects_with_file_name(data):
    with pytest.raises(UserError) as info:
        MS_COCO.parse_label_text(data, SOURCE)
    assert SOURCE in str(info.value)


def test_read_labels_names_the_bad_file(tmp_path):
    (tmp_path / "ok é.cls").write_text("\ufeff1\r\n\r\n 2 \r\n1\r\n", encoding="utf-8")
    (tmp_path / "bad é.cls").write_text("1\n80\n", encoding="utf-8")
    y = MS_COCO.read_labels(tmp_path, ["ok é"])
    assert y.shape == (1, N) and y.dtype == np.uint8 and list(np.flatnonzero(y[0])) == [1, 2]
    with pytest.raises(UserError, match="bad é.cls"):
        MS_COCO.read_labels(tmp_path, ["ok é", "bad é"])


# ===================================================================== images
def noise(h, w, channels=3, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, channels) if channels > 1 else (h, w), np.uint8)
    return arr


def save_image(path, kind):
    """Write one odd image at path (its suffix need not match its format)."""
    if kind == "gray_L":
        Image.fromarray(noise(40, 30, 1), "L").save(path, "JPEG")
    elif kind == "rgba_png_as_jpg":
        Image.fromarray(noise(30, 40, 4), "RGBA").save(path, "PNG")
    elif kind == "gif_palette_as_jpg":
        Image.fromarray(noise(33, 47)).convert("P", palette=Image.ADAPTIVE, colors=16).save(path, "GIF")
    elif kind == "palette_png_transparency":
        img = Image.fromarray(noise(20, 20)).convert("P", palette=Image.ADAPTIVE, colors=8)
        img.info["transparency"] = 0
        img.save(path, "PNG", transparency=0)
    elif kind == "cmyk_jpeg":
        Image.fromarray(noise(50, 60, 4), "RGBA").convert("CMYK").save(path, "JPEG")
    elif kind == "png16_I;16":
        arr = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 31 % 65536).astype(np.uint16)
        img = Image.fromarray(arr)
        assert img.mode.startswith("I;16")
        img.save(path, "PNG")
    elif kind == "png16_constant":
        Image.fromarray(np.full((10, 10), 40000, np.uint16)).save(path, "PNG")
    elif kind == "bilevel_1":
        Image.fromarray(noise(30, 30, 1) > 127).save(path, "PNG")
    elif kind == "float_tiff_as_jpg":
        Image.fromarray(np.linspace(-5, 5, 400, dtype=np.float32).reshape(20, 20), "F").save(path, "TIFF")
    elif kind == "one_pixel":
        Image.new("RGB", (1, 1), (200, 10, 30)).save(path, "JPEG")
    elif kind == "one_pixel_png":
        Image.new("RGB", (1, 1), (200, 10, 30)).save(path, "PNG")
    elif kind == "thin_1x700":
        Image.fromarray(noise(700, 1)).save(path, "JPEG")
    elif kind == "large_4000x3000":
        Image.new("RGB", (4000, 3000), (10, 120, 240)).save(path, "JPEG", quality=80)
    elif kind == "progressive_jpeg":
        Image.fromarray(noise(64, 48)).save(path, "JPEG", progressive=True)
    elif kind == "exif_rotated_jpeg":
        img = Image.fromarray(noise(20, 40))
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(path, "JPEG", exif=exif.tobytes())
    else:
        raise AssertionError(kind)


IMAGE_KINDS = ["gray_L", "rgba_png_as_jpg", "gif_palette_as_jpg", "palette_png_transparency", "cmyk_jpeg",
               "png16_I;16", "png16_constant", "bilevel_1", "float_tiff_as_jpg", "one_pixel", "one_pixel_png",
               "thin_1x700", "large_4000x3000", "progressive_jpeg", "exif_rotated_jpeg"]


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_decode_odd_images(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    save_image(path, kind)
    out = MS_COCO.decode_image(path, SIZE)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == np.uint8


def test_decode_one_pixel_keeps_its_colour(tmp_path):
    path = tmp_path / "p.png"
    save_image(path, "one_pixel_png")
    out = MS_COCO.decode_image(path, SIZE)
    assert (out.reshape(3, -1).T == [200, 10, 30]).all()


def test_decode_16bit_png_uses_the_full_range(tmp_path):
    path = tmp_path / "deep.png"
    save_image(path, "png16_I;16")
    out = MS_COCO.decode_image(path, SIZE)
    assert out.max() > 200 and out.min() < 50          # rescaled to 8 bits, not clipped to white


def test_decode_unicode_name_with_spaces_and_symlink(tmp_path):
    real = tmp_path / "chat noir é.jpg"
    Image.fromarray(noise(32, 32)).save(real)
    link = tmp_path / "lien vers 猫.jpg"
    link.symlink_to(real)
    a, b = MS_COCO.decode_image(real, SIZE), MS_COCO.decode_image(link, SIZE)
    assert a.shape == (3, SIZE, SIZE) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def make_bad_files(folder):
    """{name: path} of files no decoder can read."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.jpg"
    Image.fromarray(noise(64, 64)).save(good, "JPEG")
    data = good.read_bytes()
    bad = {
        "empty": folder / "empty.jpg",
        "truncated": folder / "truncated.jpg",
        "text": folder / "notes.jpg",
        "random": folder / "random.jpg",
        "directory": folder / "folder.jpg",
        "missing": folder / "missing.jpg",
        "broken_link": folder / "broken link.jpg",
    }
    bad["empty"].write_bytes(b"")
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["text"].write_text("this is not an image\n")
    bad["random"].write_bytes(np.random.default_rng(1).integers(0, 256, 3000, np.uint8).tobytes())
    bad["directory"].mkdir()
    bad["broken_link"].symlink_to(folder / "nowhere.jpg")
    return good, bad


@pytest.mark.parametrize("name", ["empty", "truncated", "text", "random", "directory", "missing", "broken_link"])
def test_decode_image_raises_on_unreadable_file(tmp_path, name):
    _, bad = make_bad_files(tmp_path)
    with pytest.raises(Exception):
        MS_COCO.decode_image(bad[name], SIZE)


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_all_reports_bad_files_and_decodes_the_rest(tmp_path, threads):
    good, bad = make_bad_files(tmp_path)
    good2 = tmp_path / "deux é.png"
    save_image(good2, "rgba_png_as_jpg")
    paths = [good, bad["empty"], bad["truncated"], good2, bad["text"], bad["directory"], bad["missing"],
             bad["broken_link"], bad["random"]]
    out = np.full((len(paths), 3, SIZE, SIZE), 255, np.uint8)
    returned, reported = MS_COCO.decode_all(paths, SIZE, out=out, threads=threads)
    assert returned is out
    bad_idx = {i for i, _ in reported}
    assert bad_idx == {1, 2, 4, 5, 6, 7, 8}
    assert all(isinstance(why, str) and why for _, why in reported)
    for i in bad_idx:
        assert not out[i].any()                        # zeroed, never left with stale pixels
    assert np.array_equal(out[0], MS_COCO.decode_image(good, SIZE))
    assert np.array_equal(out[3], MS_COCO.decode_image(good2, SIZE))


def test_decode_all_across_blocks_keeps_every_image_in_its_row(tmp_path):
    _, bad = make_bad_files(tmp_path)
    paths = []
    for i in range(81):                                # blocks of 8 over 3 threads; each image's colour is its row
        paths.append(tmp_path / f"c{i}.png")
        Image.new("RGB", (12, 9), (i * 3, 255 - i * 3, 7)).save(paths[-1])
    paths[40], paths[71] = bad["truncated"], bad["empty"]
    out, reported = MS_COCO.decode_all(paths, SIZE, threads=3, block=8)
    assert sorted(i for i, _ in reported) == [40, 71]
    assert not out[40].any() and not out[71].any()
    for i in set(range(81)) - {40, 71}:
        assert out[i, :, 0, 0].tolist() == [i * 3, 255 - i * 3, 7]


def test_decode_all_treats_a_decompression_bomb_as_bad(tmp_path, monkeypatch):
    small, big = tmp_path / "small.png", tmp_path / "bomb.png"
    Image.new("RGB", (20, 20)).save(small)
    Image.new("RGB", (40, 40)).save(big)                # 1600 px: over the limit, under twice it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    out, reported = MS_COCO.decode_all([small, big], SIZE, threads=1)
    assert [i for i, _ in reported] == [1]
    assert "DecompressionBomb" in reported[0][1]
    assert out.shape == (2, 3, SIZE, SIZE)


# ==================================================================== metrics
TAUS = MS_COCO.threshold_grid()
# exact grid values (0.7 is below its float64 value once in float32, 0.1 above), plus 0, 1, 0.5
EDGE_PROBS = sorted({float(np.float32(t)) for t in TAUS[::7]}
                    | {0.0, 1.0, 0.5, float(np.float32(0.7)), float(np.nextafter(np.float32(0.5), np.float32(0)))})


@st.composite
def scored_labels(draw, specials=()):
    n = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.sampled_from([0.0, 0.02, 0.2, 0.6, 1.0]))
    y = (rng.random((n, N)) < density).astype(np.uint8)
    mode = draw(st.sampled_from(["uniform", "ties", "edges", "mixed"]))
    if mode == "uniform":
        p = rng.random((n, N)).astype(np.float32)
    elif mode == "ties":
        p = rng.choice(np.float32([0.1, 0.3, 0.5, 0.7]), (n, N))
    elif mode == "edges":
        p = rng.choice(np.float32(EDGE_PROBS), (n, N))
    else:
        p = np.where(rng.random((n, N)) < 0.5, rng.random((n, N)), rng.choice(EDGE_PROBS, (n, N))).astype(np.float32)
    if specials:
        mask = rng.random((n, N)) < draw(st.sampled_from([0.01, 0.1, 0.5, 1.0]))
        p[mask] = rng.choice(np.float32(specials), int(mask.sum()))
    extra = draw(st.lists(st.sampled_from([0.0, 1.0, 0.5, 0.3, 0.7, 1e-7, 1 - 1e-7]), max_size=4))
    taus = np.concatenate([TAUS, np.asarray(extra, np.float64)])
    return y, p, taus


def assert_sweep_matches(y, p, taus):
    sweep = MS_COCO.sweep_thresholds(y, p, taus)
    assert np.array_equal(sweep["tau"], taus)
    for key in ("f1", "precision", "recall"):
        assert sweep[key].shape == (len(taus),)
        assert np.isfinite(sweep[key]).all()
        assert ((sweep[key] >= 0) & (sweep[key] <= 1 + 1e-12)).all()
    for i, tau in enumerate(taus):
        ref = MS_COCO.challenge_scores(y, MS_COCO.binarize(p, tau))
        for key in ("f1", "precision", "recall"):
            assert np.isfinite(ref[key]) and 0 <= ref[key] <= 1 + 1e-12
            assert abs(sweep[key][i] - ref[key]) <= 1e-9, (key, tau, sweep[key][i], ref[key])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scored_labels())
def test_sweep_equals_challenge_scores_of_binarize(case):
    assert_sweep_matches(*case)


@FAST
@given(scored_labels(specials=(np.inf, -np.inf)))
def test_sweep_with_infinite_scores_matches_binarize(case):
    assert_sweep_matches(*case)


@FAST
@given(scored_labels(specials=(np.nan, np.inf, -np.inf)))
def test_non_finite_scores_never_give_a_non_finite_score(case):
    y, p, taus = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sweep = MS_COCO.sweep_thresholds(y, p, taus)
        for key in ("f1", "precision", "recall"):
            assert np.isfinite(sweep[key]).all() and (sweep[key] >= 0).all() and (sweep[key] <= 1 + 1e-12).all()
        report = MS_COCO.validation_report(y, p, taus)
    assert np.isfinite(report["tau"])
    for part in ("best", "half"):
        for key in ("f1", "precision", "recall", "macro_f1", "micro_f1"):
            assert np.isfinite(report[part][key]) and 0 <= report[part][key] <= 1 + 1e-12
    assert np.isfinite(report["map"])


def test_sweep_with_nan_scores_matches_binarize():
    y = np.zeros((3, N), np.uint8)
    y[0, 0] = y[1, 0] = 1
    p = np.full((3, N), 0.1, np.float32)
    p[0, 0] = 0.9                 # a true positive
    p[2, 0] = np.nan              # a negative image whose score is NaN
    assert_sweep_matches(y, p, np.array([0.5]))


def test_scores_with_no_positive_label_at_all_are_zero():
    y = np.zeros((4, N), np.uint8)
    p = np.ones((4, N), np.float32)
    sweep = MS_COCO.sweep_thresholds(y, p, TAUS)
    assert not sweep["f1"].any() and not sweep["precision"].any() and not sweep["recall"].any()
    s = MS_COCO.challenge_scores(y, MS_COCO.binarize(p, 0.5))
    assert s["f1"] == s["precision"] == s["recall"] == s["macro_f1"] == s["micro_f1"] == 0.0


def test_threshold_grid_is_exact_and_inclusive():
    g = MS_COCO.threshold_grid(0.05, 0.95, 0.01)
    assert len(g) == 91 and g[0] == 0.05 and g[-1] == 0.95 and 0.5 in g and 0.7 in g
    assert (np.diff(g) > 0).all()


# ================================================================ predictions
STEM = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20)


@st.composite
def stems_and_matrix(draw):
    stems = draw(st.lists(st.one_of(STEM, STEM.map(lambda s: f" {s} é {s}")), unique=True, max_size=12))
    pred = draw(hnp.arrays(np.bool_, (len(stems), N)))
    return stems, pred


@FAST
@given(stems_and_matrix())
def test_write_predictions_round_trips_any_stems(case):
    import tempfile
    stems, pred = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sub dir" / "predictions é.json"
        preds = MS_COCO_test.predictions_dict(stems, pred)
        MS_COCO_test.write_predictions(path, preds, stems)
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
        assert listing(path.parent) == [path.name]
        assert MS_COCO_test.read_predictions(path) == loaded
    assert list(loaded) == stems
    for stem, row in zip(stems, pred):
        ids = loaded[stem]
        assert all(type(c) is int and 0 <= c < N for c in ids)
        assert ids == sorted(set(ids)) == [int(c) for c in np.flatnonzero(row)]


BASE_STEMS = ["000000000139", "chat noir é", " lead", "日本"]


def base_preds():
    return {"000000000139": [1, 5], "chat noir é": [], " lead": [0, 79], "日本": [3]}


def test_check_predictions_accepts_valid():
    MS_COCO_test.check_predictions(base_preds(), BASE_STEMS)


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda d: d.pop("chat noir é"), id="missing-stem"),
    pytest.param(lambda d: d.update({"extra": [1]}), id="extra-stem"),
    pytest.param(lambda d: d.update({"chat noir e": d.pop("chat noir é")}), id="renamed-stem"),
    pytest.param(lambda d: d.update({"日本": [80]}), id="id-80"),
    pytest.param(lambda d: d.update({"日本": [-1]}), id="id-negative"),
    pytest.param(lambda d: d.update({"日本": [3, 3]}), id="duplicate-id"),
    pytest.param(lambda d: d.update({"日本": [5, 3]}), id="descending-ids"),
    pytest.param(lambda d: d.update({"日本": [3.0]}), id="float-id"),
    pytest.param(lambda d: d.update({"日本": ["3"]}), id="string-id"),
    pytest.param(lambda d: d.update({"日本": [True]}), id="bool-id"),
    pytest.param(lambda d: d.update({"日本": [np.int64(3)]}), id="numpy-int-id"),
    pytest.param(lambda d: d.update({"日本": [None]}), id="none-id"),
    pytest.param(lambda d: d.update({"日本": [[3]]}), id="nested-list-id"),
    pytest.param(lambda d: d.update({"日本": (3,)}), id="tuple-not-list"),
    pytest.param(lambda d: d.update({"日本": 3}), id="int-not-list"),
    pytest.param(lambda d: d.update({"日本": None}), id="none-not-list"),
])
def test_check_predictions_rejects(mutate, tmp_path):
    preds = base_preds()
    mutate(preds)
    with pytest.raises(UserError):
        MS_COCO_test.check_predictions(preds, BASE_STEMS)
    # and nothing gets written
    out = tmp_path / "predictions.json"
    with pytest.raises(UserError):
        MS_COCO_test.write_predictions(out, preds, BASE_STEMS)
    assert listing(tmp_path) == []


def test_write_predictions_with_non_utf8_file_name(tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    try:
        (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    stems = [p.stem for p in MS_COCO.list_images(folder)]
    preds = MS_COCO_test.predictions_dict(stems, np.ones((1, N), bool))
    out = tmp_path / "predictions.json"
    try:
        MS_COCO_test.write_predictions(out, preds, stems)
    except UserError:
        return                                          # a clear refusal is fine
    assert json.loads(out.read_text(encoding="utf-8")) == {stems[0]: list(range(N))}


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b"{not json", b"\xff\xfe{}", b'"text"', b"null"])
def test_read_predictions_rejects_bad_files(tmp_path, content):
    path = tmp_path / "predictions.json"
    path.write_bytes(content)
    with pytest.raises(UserError):
        MS_COCO_test.read_predictions(path)


def test_read_predictions_missing_or_directory(tmp_path):
    for path in (tmp_path / "nope.json", tmp_path):
        with pytest.raises(UserError):
            MS_COCO_test.read_predictions(path)


def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_write_predictions_is_atomic_on_disk_full(tmp_path, monkeypatch, where):
    out = tmp_path / "predictions.json"
    old = json.dumps({"old": [1]}).encode()
    out.write_bytes(old)
    stems = ["a", "b é"]
    preds = MS_COCO_test.predictions_dict(stems, np.ones((2, N), bool))
    monkeypatch.setattr(os, where, disk_full)
    with pytest.raises(OSError, match="No space left"):
        MS_COCO_test.write_predictions(out, preds, stems)
    monkeypatch.undo()
    assert out.read_bytes() == old
    assert listing(tmp_path) == ["predictions.json"]
    MS_COCO_test.write_predictions(out, preds, stems)       # and a later write succeeds
    assert MS_COCO_test.read_predictions(out) == preds
    assert listing(tmp_path) == ["predictions.json"]


def test_atomic_write_text_onto_a_directory_leaves_no_temp(tmp_path):
    target = tmp_path / "metrics.csv"
    target.mkdir()
    with pytest.raises(OSError):
        MS_COCO.atomic_write_text(target, "x\n")
    assert listing(tmp_path) == ["metrics.csv"] and target.is_dir()


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_atomic_write_text_disk_full(tmp_path, monkeypatch, where):
    path = tmp_path / "config é.json"
    path.write_text("old\n", encoding="utf-8")
    monkeypatch.setattr(os, where, disk_full)
    with pytest.raises(OSError):
        MS_COCO.atomic_write_text(path, "new " * 1000)
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == "old\n"
    assert listing(tmp_path) == [path.name]


# ================================================================ checkpoints
def small_state(value=0.0):
    return {"format": MS_COCO.CHECKPOINT_FORMAT, "format_version": MS_COCO.CHECKPOINT_VERSION,
            "x": torch.full((3,), value), "name": "chat noir é"}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "run é" / "last.pth"
    MS_COCO.save_checkpoint(path, small_state(1.0))
    return path


def half_then_fail(exc):
    real_save = torch.save

    def fake(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        raise exc
    return fake


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_save_checkpoint_interrupted_mid_write_keeps_old(ckpt, monkeypatch, exc):
    before = ckpt.read_bytes()
    monkeypatch.setattr(torch, "save", half_then_fail(exc))
    with pytest.raises(type(exc)):
        MS_COCO.save_checkpoint(ckpt, small_state(2.0))
    monkeypatch.undo()
    assert ckpt.read_bytes() == before
    assert listing(ckpt.parent) == ["last.pth"]
    state = MS_COCO.load_checkpoint(ckpt)
    assert torch.equal(state["x"], torch.ones(3)) and state["name"] == "chat noir é"


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_save_checkpoint_disk_full_at_commit_keeps_old(ckpt, monkeypatch, where):
    before = ckpt.read_bytes()
    monkeypatch.setattr(os, where, disk_full)
    with pytest.raises(OSError):
        MS_COCO.save_checkpoint(ckpt, small_state(2.0))
    monkeypatch.undo()
    assert ckpt.read_bytes() == before and listing(ckpt.parent) == ["last.pth"]
    MS_COCO.save_checkpoint(ckpt, small_state(2.0))          # the next save goes through
    assert torch.equal(MS_COCO.load_checkpoint(ckpt)["x"], torch.full((3,), 2.0))
    assert listing(ckpt.parent) == ["last.pth"]


def test_save_checkpoint_of_unpicklable_state_keeps_old(ckpt):
    before = ckpt.read_bytes()
    with pytest.raises(Exception):
        MS_COCO.save_checkpoint(ckpt, {**small_state(), "bad": lambda: None})
    assert ckpt.read_bytes() == before and listing(ckpt.parent) == ["last.pth"]


class NotAllowed:
    """A class the weights_only unpickler must refuse to rebuild."""


def hostile_checkpoints(folder, good):
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    files = {}

    def put(name, content):
        files[name] = folder / f"{name} é.pth"
        files[name].write_bytes(content)

    put("empty", b"")
    for cut in (1, 64, len(data) // 2, len(data) - 1):
        put(f"truncated-{cut}", data[:cut])
    put("text", b"this is a text file, not a checkpoint\n")
    put("random", np.random.default_rng(2).integers(0, 256, 2048, np.uint8).tobytes())
    for name, obj in [("plain-dict", {"x": torch.zeros(3)}), ("a-list", [1, 2, 3]),
                      ("wrong-format", {**small_state(), "format": "something-else"}),
                      ("state-dict-only", {"fc.weight": torch.zeros(2, 2)}),
                      ("newer-version", {**small_state(), "format_version": MS_COCO.CHECKPOINT_VERSION + 1}),
                      ("code-object", {**small_state(), "evil": NotAllowed()})]:
        buf = io.BytesIO()
        torch.save(obj, buf)
        put(name, buf.getvalue())
    files["missing"] = folder / "missing é.pth"
    files["directory"] = folder / "a folder.pth"
    files["directory"].mkdir()
    return files


def test_load_checkpoint_rejects_hostile_files(tmp_path, ckpt):
    files = hostile_checkpoints(tmp_path / "hostile", ckpt)
    assert len(files) == 15
    for name, path in files.items():
        with pytest.raises(UserError) as info:
            MS_COCO.load_checkpoint(path)
        assert str(path) in str(info.value), name
    assert torch.equal(MS_COCO.load_checkpoint(ckpt)["x"], torch.ones(3))


# ================================================================ pairing
def make_pair(images, labels, stem, suffix=".jpg", ids="1\n"):
    Image.new("RGB", (8, 8)).save(images / f"{stem}{suffix}", "JPEG")
    (labels / f"{stem}.cls").write_text(ids, encoding="utf-8")


@pytest.fixture
def dirs(tmp_path):
    images, labels = tmp_path / "images é", tmp_path / "labels é"
    images.mkdir()
    labels.mkdir()
    return images, labels


def test_pair_unicode_spaces_suffixes_and_symlink(dirs, tmp_path):
    images, labels = dirs
    for stem in ["000000000139", "chat noir é", "日本 語", " lead and trail ", "a.b.c"]:
        make_pair(images, labels, stem)
    make_pair(images, labels, "UPPER", ".JPG")
    make_pair(images, labels, "png one", ".png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "target.jpg")
    (images / "lien ü.jpg").symlink_to(elsewhere / "target.jpg")
    (labels / "lien ü.cls").write_text("2\n")
    (images / "._000000000139.jpg").write_bytes(b"\x00\x05\x16\x07")   # macOS metadata, ignored
    (images / "notes.txt").write_text("ignored")
    (labels / "notes.txt").write_text("ignored")
    stems, paths = MS_COCO.pair_images_and_labels(images, labels)
    expected = sorted(["000000000139", "chat noir é", "日本 語", " lead and trail ", "a.b.c", "UPPER", "png one",
                       "lien ü"])
    assert stems == expected
    assert [p.stem for p in paths] == stems
    assert all(p.parent == images for p in paths)
    y = MS_COCO.read_labels(labels, stems)
    assert y[stems.index("lien ü"), 2] == 1 and y.sum() == len(stems)
    out, bad = MS_COCO.decode_all(paths, 8, threads=1)
    assert bad == []


def test_pair_reports_unicode_normalisation_mismatch(dirs):
    images, labels = dirs
    make_pair(images, labels, "ok")
    Image.new("RGB", (8, 8)).save(images / "cafe\u0301.jpg")           # NFD, as macOS writes it
    (labels / "caf\u00e9.cls").write_text("1\n")                        # NFC
    with pytest.raises(UserError) as info:
        MS_COCO.pair_images_and_labels(images, labels)
    assert "no label file" in str(info.value) and "no image" in str(info.value)


def test_pair_empty_folders(dirs):
    images, labels = dirs
    with pytest.raises(UserError):
        MS_COCO.pair_images_and_labels(images, labels)
    make_pair(images, labels, "x")
    (labels / "x.cls").unlink()
    with pytest.raises(UserError):
        MS_COCO.pair_images_and_labels(images, labels)


def test_pair_ignores_hidden_label_files_like_hidden_images(dirs):
    images, labels = dirs
    make_pair(images, labels, "000000000139")
    (images / "._000000000139.jpg").write_bytes(b"\x00\x05\x16\x07")
    (labels / "._000000000139.cls").write_bytes(b"\x00\x05\x16\x07")
    stems, _ = MS_COCO.pair_images_and_labels(images, labels)
    assert stems == ["000000000139"]


def test_pair_rejects_two_images_with_one_stem(dirs):
    images, labels = dirs
    make_pair(images, labels, "twin")
    make_pair(images, labels, "twin", ".png")
    make_pair(images, labels, "single")
    with pytest.raises(UserError, match=r"same name, e\.g\. \['twin'\]"):
        MS_COCO.pair_images_and_labels(images, labels)


def test_load_checkpoint_rejects_a_non_integer_format_version(tmp_path):
    path = tmp_path / "odd version.pth"
    torch.save({**small_state(), "format_version": "2"}, path)
    with pytest.raises(UserError, match="format version"):
        MS_COCO.load_checkpoint(path)
