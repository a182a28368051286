-- ghostpen for Neovim 0.7+: starts `ghostpen agent --stdio`, shows its inline completion at the
-- cursor as ghost text, and tells it what the developer did with each suggestion.
local M = {}

local api = vim.api
local ns = api.nvim_create_namespace("ghostpen")

local defaults = {
  cmd = { "ghostpen", "agent", "--stdio" },
  server = "127.0.0.1:50151",
  token = "",
  settings = {}, -- any agent setting, e.g. { debounce_max_ms = 200 }
  keys = {
    accept = "<Tab>",
    accept_word = "<M-Right>",
    accept_line = "<M-Down>",
    dismiss = "<C-]>",
    trigger = "<M-\\>", -- ask now, without waiting for a pause
  },
  highlight = "Comment",
}

local config = nil
local state = {
  client_id = nil,
  pending = nil, -- id of the inline completion request in flight
  suggestion = nil, -- { buf, row, col, before, text, completion_id, uri }
  shown = {}, -- completion ids reported as shown
  renders = {}, -- { requested_tick, rendered_tick } of each suggestion drawn, for tests
  stale = 0, -- answers that came after the text or cursor moved on, never drawn
  messages = {},
}

local function client()
  return state.client_id and vim.lsp.get_client_by_id(state.client_id)
end

local function cursor()
  local pos = api.nvim_win_get_cursor(0)
  return pos[1] - 1, pos[2]
end

local function line_before(buf, row, col)
  return api.nvim_buf_get_lines(buf, row, row + 1, false)[1]:sub(1, col)
end

local function clear()
  for _, buf in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_valid(buf) then
      api.nvim_buf_clear_namespace(buf, ns, 0, -1)
    end
  end
end

local function notify(method, params)
  local lsp = client()
  if lsp then
    lsp.notify(method, params)
  end
end

-- An LSP position (UTF-16) for a byte column of a buffer line.
local function position(buf, row, col)
  local line = api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ""
  local _, utf16 = vim.str_utfindex(line, math.min(col, #line))
  return { line = row, character = utf16 }
end

local function render(s)
  clear()
  local lines = vim.split(s.text, "\n", { plain = true })
  local line = api.nvim_buf_get_lines(s.buf, s.row, s.row + 1, false)[1]
  local opts = {
    virt_text = { { lines[1], config.highlight } },
    virt_text_pos = s.col >= #line and "overlay" or "eol",
    hl_mode = "combine",
  }
  if #lines > 1 then
    opts.virt_lines = {}
    for i = 2, #lines do
      table.insert(opts.virt_lines, { { lines[i], config.highlight } })
    end
  end
  api.nvim_buf_set_extmark(s.buf, ns, s.row, s.col, opts)
  s.tick = api.nvim_buf_get_changedtick(s.buf)
  if not state.shown[s.completion_id] then
    state.shown[s.completion_id] = true
    notify("ghostpen/didShowCompletion", { completionId = s.completion_id })
  end
end

local function reject(reason)
  local s = state.suggestion
  state.suggestion = nil
  clear()
  if s then
    notify("ghostpen/didReject", { completionId = s.completion_id, reason = reason })
  end
end

function M.request(manual)
  local lsp = client()
  if not lsp or api.nvim_get_mode().mode:sub(1, 1) ~= "i" then
    return
  end
  if state.pending then
    lsp.cancel_request(state.pending)
    state.pending = nil
  end
  local buf = api.nvim_get_current_buf()
  local tick = api.nvim_buf_get_changedtick(buf)
  local row, col = cursor()
  local params = vim.lsp.util.make_position_params(0, lsp.offset_encoding)
  params.context = { triggerKind = manual and 1 or 2 }
  local id
  _, id = lsp.request("textDocument/inlineCompletion", params, function(err, result)
    if state.pending == id then
      state.pending = nil
    end
    -- A newer keystroke or a cursor move made this answer stale: it is never drawn.
    if err or not result then
      return
    end
    local now_row, now_col = cursor()
    if api.nvim_get_current_buf() ~= buf or api.nvim_buf_get_changedtick(buf) ~= tick
      or now_row ~= row or now_col ~= col or api.nvim_get_mode().mode:sub(1, 1) ~= "i" then
      state.stale = state.stale + 1
      return
    end
    local item = (result.items or result)[1]
    if not item or item.insertText == "" then
      return
    end
    local accepted = item.command and item.command.arguments and item.command.arguments[1] or {}
    state.suggestion = {
      buf = buf, row = row, col = col, before = line_before(buf, row, col),
      text = type(item.insertText) == "table" and item.insertText.value or item.insertText,
      completion_id = accepted.completionId, uri = params.textDocument.uri,
    }
    table.insert(state.renders, { tick, api.nvim_buf_get_changedtick(buf) })
    render(state.suggestion)
  end, buf)
  state.pending = id
end

-- After a change in insert mode: typing the suggestion's own text keeps the rest on screen;
-- anything else rejects it. Either way the agent is asked (it answers from its cache when typed
-- through).
local function on_text_changed()
  local s = state.suggestion
  if s then
    local buf = api.nvim_get_current_buf()
    local row, col = cursor()
    local now = row == s.row and buf == s.buf and line_before(buf, row, col) or nil
    local typed = now and now:sub(1, #s.before) == s.before and now:sub(#s.before + 1) or nil
    if typed and #typed < #s.text and s.text:sub(1, #typed) == typed then
      s.text, s.col, s.before = s.text:sub(#typed + 1), col, now
      render(s)
    else
      reject("typed_over")
    end
  end
  M.request(false)
end

-- Accept the whole suggestion, or its next word or line; returns whether there was one.
function M.accept(unit)
  local s = state.suggestion
  if not s or api.nvim_get_current_buf() ~= s.buf then
    return false
  end
  local text = s.text
  if unit == "word" then
    text = text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]+") or text:match("^%s+") or text
  elseif unit == "line" then
    text = text:match("^[^\n]*\n?")
  end
  local at = position(s.buf, s.row, s.col)
  local rest = s.text:sub(#text + 1)
  state.suggestion = nil
  clear()
  local lines = vim.split(text, "\n", { plain = true })
  api.nvim_buf_set_text(s.buf, s.row, s.col, s.row, s.col, lines)
  local end_row = s.row + #lines - 1
  local end_col = (#lines == 1 and s.col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  local report = { completionId = s.completion_id, uri = s.uri, position = at, text = text }
  if rest == "" then
    notify("ghostpen/didAccept", report)
  else
    report.unit = unit
    notify("ghostpen/didPartiallyAccept", report)
    state.suggestion = {
      buf = s.buf, row = end_row, col = end_col, before = line_before(s.buf, end_row, end_col),
      text = rest, completion_id = s.completion_id, uri = s.uri,
    }
    render(state.suggestion)
  end
  return true
end

function M.dismiss()
  reject("dismissed")
end

function M.status()
  local lsp = client()
  return {
    running = lsp ~= nil and not lsp.is_stopped(),
    -- the agent has initialized and holds the current buffer
    attached = lsp ~= nil and lsp.initialized == true
      and vim.lsp.buf_is_attached(api.nvim_get_current_buf(), lsp.id),
    suggestion = state.suggestion and state.suggestion.text or nil,
    before = state.suggestion and state.suggestion.before or nil, -- the line before the cursor
    completion_id = state.suggestion and state.suggestion.completion_id or nil,
    pending = state.pending,
    renders = state.renders,
    stale = state.stale,
    messages = state.messages,
  }
end

local function feed(keys)
  api.nvim_feedkeys(api.nvim_replace_termcodes(keys, true, false, true), "n", false)
end

local function map(lhs, action)
  if lhs and lhs ~= "" then
    vim.keymap.set("i", lhs, function()
      if not action() then
        feed(lhs)
      end
    end, { desc = "ghostpen", silent = true })
  end
end

local function attach(buf)
  if state.client_id and vim.bo[buf].buftype == "" and api.nvim_buf_get_name(buf) ~= "" then
    vim.lsp.buf_attach_client(buf, state.client_id)
  end
end

function M.setup(opts)
  if state.client_id then
    vim.lsp.stop_client(state.client_id) -- set up again: the new options take over
    state.client_id = nil
  end
  config = vim.tbl_deep_extend("force", defaults, opts or {})
  local init_options = vim.tbl_extend("force", config.settings, { server = config.server })
  if config.token ~= "" then
    init_options.token = config.token
  end
  state.client_id = vim.lsp.start_client({
    name = "ghostpen",
    cmd = config.cmd,
    root_dir = vim.loop.cwd(),
    init_options = init_options,
    flags = { debounce_text_changes = 0 }, -- the agent debounces, adaptively
    handlers = {
      ["window/logMessage"] = function(_, params)
        -- The agent says a lost connection once, not once per retry.
        table.insert(state.messages, params.message)
        api.nvim_echo({ { params.message, "WarningMsg" } }, true, {})
      end,
    },
  })
  local group = api.nvim_create_augroup("ghostpen", { clear = true })
  api.nvim_create_autocmd("BufEnter", { group = group, callback = function(args) attach(args.buf) end })
  api.nvim_create_autocmd("TextChangedI", { group = group, callback = on_text_changed })
  api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group,
    callback = function()
      reject("dismissed")
    end,
  })
  api.nvim_create_autocmd("CursorMovedI", {
    group = group,
    callback = function()
      -- Only a move without a change: a change is TextChangedI's to judge.
      local s = state.suggestion
      local row, col = cursor()
      local moved = s and (row ~= s.row or col ~= s.col)
      if moved and api.nvim_buf_get_changedtick(s.buf) == s.tick then
        reject("dismissed")
      end
    end,
  })
  map(config.keys.accept, function() return M.accept("all") end)
  map(config.keys.accept_word, function() return M.accept("word") end)
  map(config.keys.accept_line, function() return M.accept("line") end)
  map(config.keys.dismiss, function()
    if state.suggestion then
      M.dismiss()
      return true
    end
    return false
  end)
  map(config.keys.trigger, function()
    M.request(true)
    return true
  end)
  attach(api.nvim_get_current_buf())
end

return M
