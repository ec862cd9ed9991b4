// TopoCL arena: no framework. Pages work without this file; it only stops double submits,
// asks before ending a session and says that both models are writing.
document.querySelectorAll("form").forEach(function (form) {
  form.addEventListener("submit", function (ev) {
    var btn = ev.submitter;
    if (btn && btn.dataset.confirm && !window.confirm(btn.dataset.confirm)) { ev.preventDefault(); return; }
    if (form.dataset.sent) { ev.preventDefault(); return; }
    form.dataset.sent = "1";
    if (form.dataset.testid === "turn-form" || form.getAttribute("data-testid") === "turn-form") {
      var note = document.createElement("p");
      note.className = "meta";
      note.setAttribute("data-testid", "writing");
      note.textContent = "Both models are writing…";
      form.appendChild(note);
    }
  });
});
// Typing a premise of your own selects "My own premise" (the server refuses a premise sent with a campaign world).
var custom = document.querySelector("input[name=world][value=custom]");
["title", "premise", "facts"].forEach(function (name) {
  var field = custom && custom.form.querySelector("[name=" + name + "]");
  if (field) field.addEventListener("input", function () { if (field.value.trim()) custom.checked = true; });
});
