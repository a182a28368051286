-- ghostpen: ghost-text code completions. Nothing starts until require("ghostpen").setup{} is called.
if vim.g.loaded_ghostpen then
  return
end
vim.g.loaded_ghostpen = true

vim.api.nvim_create_user_command("GhostpenStatus", function()
  print(vim.inspect(require("ghostpen").status()))
end, {})
