// Live progress of running runs: every few seconds, fetch the counters (JSON) and update the cells that show them;
// reload the page once a run stops running, so everything else on it is current too. No framework, no build step.
(function () {
  const url = document.body.dataset.poll;
  const seconds = Number(document.body.dataset.pollSeconds || 2);
  async function poll() {
    try {
      const response = await fetch(url, { cache: "no-store" });
      if (!response.ok) return;
      for (const run of await response.json()) {
        for (const cell of document.querySelectorAll(`[data-run="${run.id}"][data-field]`)) {
          const field = cell.dataset.field;
          if (field === "status") {
            if (run.status !== "running") { location.reload(); return; }
            continue;
          }
          let value = run[field];
          if (field === "keep_rate") value = value === null ? "—" : `${Math.round(100 * value)}%`;
          if (field === "updated_at") value = value.replace("T", " ").slice(0, 19);
          cell.textContent = value;
        }
      }
    } catch (error) {
      // the server is restarting or gone: try again at the next tick
    }
  }
  setInterval(poll, seconds * 1000);
})();
