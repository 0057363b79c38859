"""A self-contained HTML page of a score output: look at the images beside their judgement.

One file, no server, no network: thumbnails are embedded as data URIs, styles and the
sort-by-column script are inline. For generation scores each row is an image with its
prompt, every spec question with the expected answer, the Solver's answers, majority and
match, the caption and R_G with its components; a summary per GenEval category and overall
heads the page. For ``--difficulty`` outputs the images are grouped by bucket with their
chosen question, the Proposer's candidates and the vote.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path
from statistics import fmean

from PIL import Image

from asg_kit.images import BadImage, load_image
from asg_kit.jsonl import _write_atomic as write_text_atomic
from asg_kit.jsonl import read_jsonl

THUMBNAIL_SIZE = 160
BUCKET_ORDER = ("hard", "medium", "easy", "unsolvable")

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#1d1d1f}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.15em;margin:1.4em 0 .4em}
.meta{color:#555;font-size:.9em;margin-bottom:1em}
table{border-collapse:collapse;width:100%;font-size:.88em}
th,td{border:1px solid #ddd;padding:.35em .5em;vertical-align:top;text-align:left}
th{background:#f3f3f5;position:sticky;top:0}
th.sortable{cursor:pointer;user-select:none} th.sortable:after{content:" \\2195";color:#999}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img.thumb{width:THUMBpx;height:auto;image-rendering:pixelated;border:1px solid #ccc}
.ok{color:#0a7d32} .bad{color:#b3261e} .muted{color:#777}
ul.qs{margin:0;padding-left:1.1em} ul.qs li{margin:.1em 0}
table.summary{width:auto} .error td{background:#fff4f4}
""".replace("THUMB", str(THUMBNAIL_SIZE))

_SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th.sortable').forEach(function(th, column){
    th.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var index = th.cellIndex, descending = th.dataset.order !== 'desc';
      rows.sort(function(a, b){
        // rows of unscorable images have no such cell: they always sink to the bottom
        var ca = a.cells[index], cb = b.cells[index];
        if (!ca || !cb) return (!ca) - (!cb);
        var x = ca.dataset.value, y = cb.dataset.value;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return descending ? -c : c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
      th.dataset.order = descending ? 'desc' : 'asc';
    });
  });
});
// report.html#sort=R_G opens sorted by that column (descending); a link can carry the view.
var wanted = decodeURIComponent((location.hash.match(/sort=([^&]+)/) || [])[1] || '');
if (wanted) {
  document.querySelectorAll('th.sortable').forEach(function(th){ if (th.textContent === wanted) th.click(); });
}
// How many thumbnails the browser decoded, for anyone checking the page renders.
window.addEventListener('load', function(){
  var images = document.querySelectorAll('img.thumb');
  document.body.dataset.imagesLoaded = Array.prototype.filter.call(images, function(i){ return i.complete && i.naturalWidth > 0; }).length;
});
"""


def thumbnail_uri(path: Path, size: int = THUMBNAIL_SIZE) -> str | None:
    """A PNG data URI of the image shrunk to ``size`` pixels wide, or None when unreadable."""
    try:
        image = load_image(path).image
    except (BadImage, OSError):
        return None
    image = image.convert("RGB")
    if image.width > size:
        image = image.resize((size, max(1, round(image.height * size / image.width))), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def _cell_num(value, digits: int = 3) -> str:
    sort_value = value if isinstance(value, (int, float)) else ""
    return f'<td class="num" data-value="{_e(sort_value)}">{_num(value, digits)}</td>'


def _image_cell(folder: Path, row: dict) -> str:
    uri = thumbnail_uri(folder / row["image"])
    picture = f'<img class="thumb" alt="{_e(row["image"])}" src="{uri}">' if uri else '<span class="muted">(unreadable)</span>'
    return f'<td data-value="{_e(row["image"])}">{picture}<br><span class="muted">{_e(row["image"])}</span></td>'


def _questions_list(questions: list[dict]) -> str:
    items = []
    for q in questions:
        match = q.get("match")
        mark = "ok" if isinstance(match, (int, float)) and match >= 0.5 else "bad"
        answers = ", ".join(_e(a) for a in q.get("answers", []))
        items.append(
            f'<li>{_e(q.get("question"))} <span class="muted">expected</span> <b>{_e(q.get("expected"))}</b>'
            f' · <span class="muted">answers</span> {answers} · <span class="muted">majority</span> '
            f'<span class="{mark}">{_e(q.get("majority"))}</span> ({_num(match, 2)})</li>'
        )
    return '<ul class="qs">' + "".join(items) + "</ul>"


def _read_rows(rows_path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(rows_path) if isinstance(row.get("image"), str)]


def _summary_table(title: str, groups: dict[str, list[float]]) -> str:
    lines = [f"<h2>{_e(title)}</h2>", '<table class="summary"><thead><tr><th>group</th><th>images</th><th>mean R_G</th></tr></thead><tbody>']
    for name, values in groups.items():
        lines.append(f"<tr><td>{_e(name)}</td><td class=\"num\">{len(values)}</td><td class=\"num\">{_num(fmean(values))}</td></tr>")
    return "".join(lines) + "</tbody></table>"


def _generation_body(rows: list[dict], folder: Path) -> str:
    scored = [row for row in rows if row.get("status") == "scored" and isinstance(row.get("reward"), (int, float))]
    per_category: dict[str, list[float]] = defaultdict(list)
    for row in scored:
        per_category[row.get("tag") or "(no category)"].append(row["reward"])
    parts = []
    if scored:
        parts.append(_summary_table("Summary", {**per_category, "overall": [row["reward"] for row in scored]}))
    parts.append('<h2>Images</h2><table class="sortable" id="rows"><thead><tr>')
    headers = [("image", True), ("prompt", True), ("questions: expected · Solver answers · majority (match)", False), ("caption", True),
               ("R_G", True), ("S_fid", True), ("S_cyc", True), ("S_div", True), ("contradiction", True), ("quality", True)]
    parts.extend(f'<th class="{"sortable" if sortable else ""}">{_e(name)}</th>' for name, sortable in headers)
    parts.append("</tr></thead><tbody>")
    for row in rows:
        if row.get("status") != "scored":
            parts.append(
                f'<tr class="error">{_image_cell(folder, row)}<td data-value="{_e(row.get("prompt"))}">{_e(row.get("prompt"))}</td>'
                f'<td colspan="8" class="bad">not scored: {_e(row.get("reason") or row.get("status"))}</td></tr>'
            )
            continue
        parts.append(
            f'<tr>{_image_cell(folder, row)}<td data-value="{_e(row.get("prompt"))}">{_e(row.get("prompt"))}'
            f'<br><span class="muted">{_e(row.get("tag") or "")}</span></td>'
            f"<td>{_questions_list(row.get('questions', []))}</td>"
            f'<td data-value="{_e(row.get("caption"))}">{_e(row.get("caption"))}</td>'
            + "".join(_cell_num(row.get(key)) for key in ("reward", "s_fid", "s_cyc", "s_div", "contradiction", "quality"))
            + "</tr>"
        )
    parts.append("</tbody></table>")
    return "".join(parts)


def _difficulty_body(rows: list[dict], folder: Path) -> str:
    by_bucket: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_bucket[row.get("bucket") or ("not scored" if row.get("status") != "scored" else "(none)")].append(row)
    order = [b for b in BUCKET_ORDER if b in by_bucket] + sorted(b for b in by_bucket if b not in BUCKET_ORDER)
    parts = ['<h2>Summary</h2><table class="summary"><thead><tr><th>bucket</th><th>images</th></tr></thead><tbody>']
    parts.extend(f'<tr><td>{_e(b)}</td><td class="num">{len(by_bucket[b])}</td></tr>' for b in order)
    parts.append("</tbody></table>")
    for bucket in order:
        parts.append(f'<h2>{_e(bucket)}</h2><table class="sortable"><thead><tr>')
        for name, sortable in (("image", True), ("question", True), ("Proposer candidates (d_STE · greedy answer)", False),
                               ("Solver answers", False), ("majority", True), ("share", True), ("H_SC", True), ("d_STE", True)):
            parts.append(f'<th class="{"sortable" if sortable else ""}">{_e(name)}</th>')
        parts.append("</tr></thead><tbody>")
        for row in by_bucket[bucket]:
            if row.get("status") != "scored":
                parts.append(f'<tr class="error">{_image_cell(folder, row)}<td colspan="7" class="bad">not scored: {_e(row.get("reason") or row.get("status"))}</td></tr>')
                continue
            candidates = "".join(
                f"<li>{_e(c.get('question'))} ({_num(c.get('d_ste'), 2)} · {_e(c.get('greedy_answer'))})</li>" for c in row.get("candidates", [])
            )
            parts.append(
                f'<tr>{_image_cell(folder, row)}<td data-value="{_e(row.get("question"))}">{_e(row.get("question"))}</td>'
                f'<td><ul class="qs">{candidates}</ul></td><td>{", ".join(_e(a) for a in row.get("answers", []))}</td>'
                f'<td data-value="{_e(row.get("majority"))}">{_e(row.get("majority"))}</td>'
                + "".join(_cell_num(row.get(key)) for key in ("majority_share", "entropy", "d_ste"))
                + "</tr>"
            )
        parts.append("</tbody></table>")
    return "".join(parts)


def is_difficulty_output(rows: list[dict]) -> bool:
    return any("bucket" in row or "candidates" in row for row in rows)


def scored_folder(rows_path: str | Path) -> Path:
    """The image folder a score output was made from: its job record's, else the output's own folder."""
    from asg_kit.score import job_path

    record = job_path(Path(rows_path))
    try:
        folder = json.loads(record.read_text()).get("folder")
    except (OSError, ValueError, AttributeError):
        folder = None
    return Path(folder) if isinstance(folder, str) else Path(rows_path).parent


def write_score_report(rows_path: str | Path, folder: str | Path | None = None, out: str | Path | None = None, title: str | None = None) -> Path:
    """Write the HTML page of the score output ``rows_path`` (images read from ``folder``,
    by default the one its job record names) atomically to ``out`` (default: beside the
    rows, ``.html``) and return its path."""
    rows_path = Path(rows_path)
    folder = Path(folder) if folder is not None else scored_folder(rows_path)
    out = Path(out) if out is not None else rows_path.with_suffix(".html")
    rows = _read_rows(rows_path)
    difficulty = is_difficulty_output(rows)
    body = _difficulty_body(rows, folder) if difficulty else _generation_body(rows, folder)
    scored = sum(row.get("status") == "scored" for row in rows)
    heading = title or ("Difficulty of " if difficulty else "Scores of ") + folder.name
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(heading)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(heading)}</h1>"
        f'<div class="meta">{scored} of {len(rows)} images scored · rows: {_e(rows_path.name)} · folder: {_e(folder)}'
        + ("" if difficulty else " · click a column header to sort")
        + f"</div>{body}<script>{_SORT_SCRIPT}</script></body></html>"
    )
    write_text_atomic(out, page)
    return out

