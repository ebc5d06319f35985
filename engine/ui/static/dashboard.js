// stepvault dashboard: live updates of a running session, and confirmation of destructive actions.
// The server renders every fragment (escaped); this script only fetches and swaps them in.
"use strict";

const POLL_MS = 1000;
const FULL_REFRESH_EVERY = 5; // polls: redraw even when nothing was committed, so "now" moves

function confirmForms(root) {
  for (const form of root.querySelectorAll("form[data-confirm]")) {
    if (form.dataset.bound) continue;
    form.dataset.bound = "1";
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
}

function followLive() {
  const live = document.getElementById("live");
  const state = document.getElementById("live-state");
  if (!live || !state) return;
  let polls = 0;

  async function poll() {
    if (live.dataset.active !== "true") {
      state.textContent = "";
      state.dataset.state = "idle";
      return;
    }
    polls += 1;
    const url = new URL(live.dataset.url, window.location.href);
    if (polls % FULL_REFRESH_EVERY !== 0) url.searchParams.set("revision", live.dataset.revision);
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 200) {
        live.innerHTML = await response.text();
        confirmForms(live);
      }
      if (response.ok) {
        live.dataset.revision = response.headers.get("X-Revision") || live.dataset.revision;
        live.dataset.active = response.headers.get("X-Active") || "false";
        state.dataset.state = "live";
        state.textContent = "live: updated " + new Date().toLocaleTimeString();
      } else {
        state.dataset.state = "stale";
        state.textContent = "not updating: the server answered " + response.status;
      }
    } catch (error) {
      state.dataset.state = "stale";
      state.textContent = "not updating: the server cannot be reached; retrying";
    }
    window.setTimeout(poll, POLL_MS);
  }

  window.setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  confirmForms(document);
  followLive();
});
