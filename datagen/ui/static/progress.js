// Live pages of running runs: every few seconds, fetch this same page again and swap in the parts marked data-live
// (counters, "N matching", the item table, "Rejected by reason", the runs table), so they all move together, in place:
// no reload, no scroll reset, the filter form untouched. Polling stops once the page says nothing is running any more
// (after one last swap). No framework, no build step.
(function () {
  const seconds = Number(document.body.dataset.pollSeconds || 2);
  let timer = null;
  async function poll() {
    try {
      const response = await fetch(location.href, { cache: "no-store", headers: { "X-Datagen-Poll": "1" } });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const part of document.querySelectorAll("[data-live][id]")) {
        const update = fresh.getElementById(part.id);
        if (!update || update.innerHTML === part.innerHTML) continue;
        const checked = [...part.querySelectorAll("input:checked")].map((box) => `${box.name}=${box.value}`);
        part.innerHTML = update.innerHTML;
        for (const box of part.querySelectorAll("input[type=checkbox]")) box.checked = checked.includes(`${box.name}=${box.value}`);
      }
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
