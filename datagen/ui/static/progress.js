// Live pages of running runs: every few seconds, fetch this same page again and swap in the parts marked data-live
// (counters, "N matching", the item table, "Rejected by reason", the runs table), so they all move together, in place:
// no reload, no scroll reset, the filter form untouched. Polling stops once the page says nothing is running any more
// (after one last swap). The item row at the top of the window stays where it was on screen: when a part above it
// grows (a new rejection reason, a wrapped line), the window scrolls by as much (the browser's own scroll anchoring
// cannot, since the swap replaces the row it anchored to). No framework, no build step.
(function () {
  const seconds = Number(document.body.dataset.pollSeconds || 2);
  let timer = null;
  const rows = () => [...document.querySelectorAll("table.items tbody tr")];
  function anchor() {
    if (window.scrollY === 0) return null; // at the top, the top stays in view
    const row = rows().find((r) => r.getBoundingClientRect().bottom > 0);
    return row ? { key: row.cells[0].textContent, top: row.getBoundingClientRect().top } : null;
  }
  function restore(before) {
    const row = before && rows().find((r) => r.cells[0].textContent === before.key);
    if (row) window.scrollBy(0, row.getBoundingClientRect().top - before.top);
  }
  async function poll() {
    try {
      const response = await fetch(location.href, { cache: "no-store", headers: { "X-Datagen-Poll": "1" } });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      const before = anchor();
      for (const part of document.querySelectorAll("[data-live][id]")) {
        const update = fresh.getElementById(part.id);
        if (!update || update.innerHTML === part.innerHTML) continue;
        const checked = [...part.querySelectorAll("input:checked")].map((box) => `${box.name}=${box.value}`);
        part.innerHTML = update.innerHTML;
        for (const box of part.querySelectorAll("input[type=checkbox]")) box.checked = checked.includes(`${box.name}=${box.value}`);
      }
      restore(before);
      document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
      if (!fresh.body.dataset.poll) {
        clearInterval(timer);
        delete document.body.dataset.poll;
      }
    } catch (error) {
      // the server is restarting or gone: try again at the next tick
    }
  }
  timer = setInterval(poll, seconds * 1000);
})();
