// nftbench leaderboard page: sort and filter the cell table, open a cell's detail. No libraries, no network.
(function () {
  "use strict";
  const table = document.getElementById("cells");
  const dialog = document.getElementById("detail");
  if (table) {
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const filters = Array.from(document.querySelectorAll("select[data-filter]"));
    const search = document.getElementById("search");
    const count = document.getElementById("count");
    const apply = function () {
      const text = search.value.trim().toLowerCase();
      let shown = 0;
      for (const row of rows) {
        const keep = filters.every((f) => !f.value || row.dataset[f.dataset.filter] === f.value) &&
          (!text || row.textContent.toLowerCase().includes(text));
        row.hidden = !keep;
        shown += keep ? 1 : 0;
      }
      count.textContent = shown + " of " + rows.length + " cells";
    };
    filters.forEach((f) => f.addEventListener("change", apply));
    search.addEventListener("input", apply);
    const heads = Array.from(table.tHead.rows[0].cells);
    heads.forEach((th, i) => th.addEventListener("click", function () {
      const ascending = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach((h) => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      const numeric = th.dataset.type === "num";
      const value = (row) => {
        const v = row.cells[i].dataset.v;
        return v === undefined ? row.cells[i].textContent.trim() : v;
      };
      rows.sort(function (a, b) {
        const va = value(a), vb = value(b);
        if (va === "" || vb === "") return (va === "") - (vb === "");  // blanks last, either way
        const d = numeric ? Number(va) - Number(vb) : va.localeCompare(vb, undefined, {numeric: true});
        return ascending ? d : -d;
      });
      rows.forEach((r) => body.appendChild(r));
    }));
    apply();
  }
  const open = function (key) {
    const template = document.getElementById("d-" + key);
    if (!template || !dialog) return;
    const body = dialog.querySelector(".body");
    body.replaceChildren(template.content.cloneNode(true));
    dialog.querySelector("h2").textContent = template.dataset.title;
    dialog.showModal();
  };
  document.addEventListener("click", function (e) {
    if (e.target.closest("a, button, select, input, dialog")) return;
    const cell = e.target.closest("[data-key]");
    if (cell) open(cell.dataset.key);
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && e.target.dataset && e.target.dataset.key) open(e.target.dataset.key);
  });
  if (dialog) dialog.querySelector("button.close").addEventListener("click", () => dialog.close());
})();
