"""The map's page block (minilm/report_map.py) without a browser: it draws metrics.json's numbers, loads nothing
from the network, and leaves a static PNG beside the page. test_browser.py opens it in Chromium."""

import json
import re

from map_fixture import write_map_page
from minilm import report_map


def test_the_page_carries_metrics_json_map_and_loads_nothing_from_outside(tmp_path):
    page, _ = write_map_page(tmp_path / "report")
    text = page.read_text(encoding="utf-8")
    on_disk = json.loads((tmp_path / "report" / "metrics.json").read_text())["map"]
    assert report_map.read_data(text) == on_disk  # one source of truth
    # nothing is fetched: no script, stylesheet or image points outside the page
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']?(https?:)?//""", text)
    assert "Bokeh" in text and "map-layer" in text
    png = tmp_path / "report" / "figures" / "map.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_script_end_inside_the_numbers_cannot_end_the_block():
    data = {"words": ["</script><b>"]}
    assert "</script>" not in report_map.data_json(data)
    assert report_map.read_data(f"<script type='application/json' id='minilm-map-data'>{report_map.data_json(data)}"
                                "</script>") == data
