"""FRA explorer (Streamlit). Reads an index through fra.queries only; never imports torch.

Run with `fra app --index runs/demo` (or FRA_INDEX=... streamlit run fra/app/main.py).
Pages: Home, Feature search, Head, Channel, Sample, CIH. Every page keeps its state in the URL
query parameters, both ways (see fra.app.ui), so a channel is a link:
?page=Channel&layer=17&head=6&fq=12&fk=40, and an attention score is a link:
?page=Head&layer=18&head=6&sample=3&q=40&k=21. Every view is a step of the browser history (Back
and Forward work), and links stay in the tab. A value in the URL that the index does not have is
replaced by a default, with a message saying what was wrong and what is available; a layer the
index did not index is refused (with the indexed layers), never replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import streamlit as st

from fra.app import cih_page, cot_page, pages, ui
from fra.app.state import pick_page
from fra.queries import IndexNotFound, manifest
from fra.queries.lib import INDEX_LACKS

PAGES = {
    "Home": None,
    "Feature search": pages.page_feature,
    "Head": pages.page_head,
    "Channel": pages.page_channel,
    "Sample": pages.page_sample,
    "CIH": cih_page.page_cih,
    "CoT": cot_page.page_cot,
}


def index_path() -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--index", default=os.environ.get("FRA_INDEX", "runs/demo"))
    args, _ = p.parse_known_args(sys.argv[1:])
    return Path(args.index)


st.set_page_config(page_title="FRA explorer", layout="wide")
INDEX = index_path()
try:
    meta = manifest(INDEX)
    ui.connection(str(INDEX.resolve()))
except (IndexNotFound, FileNotFoundError, ValueError, *INDEX_LACKS) as exc:
    st.error(f"Cannot open the index {INDEX}: {exc}")
    st.stop()
st.session_state["_index"] = str(INDEX.resolve())
st.session_state["_url"] = {}
if ui.adopt_url() or "page" not in st.session_state:
    choice = pick_page(ui.url_param("page"), list(PAGES), "Home")
    if choice.problem:
        st.warning(choice.problem)
    st.session_state["page"] = choice.value
st.sidebar.title("FRA explorer")
page = st.sidebar.radio("page", list(PAGES), key="page")
st.sidebar.caption(
    f"index `{INDEX}`: {meta.get('model')}, layers {meta.get('layers')}, {meta.get('n_samples')} samples"
)
st.sidebar.caption("Every page's state is in the address bar: copy it to share what you see.")
try:
    if page == "Home":
        pages.page_home(meta)
    else:
        PAGES[page]()
except ui.QueryFailed as exc:
    st.error(
        f"This page needs something the index does not have: {exc}. The index may come from another "
        "version of FRA; rebuild it with `fra ingest`."
    )
except ui.Refused as exc:
    st.warning(str(exc))
    for label, params in exc.links:
        ui.nav(st, label, ui.link(page, **{k: v for k, v in params.items() if k != "page"}))
    ui.url().update({k: v for k, v in ui.params().items() if k != "page"})  # the URL stays as asked
finally:
    ui.sync_url(page)
