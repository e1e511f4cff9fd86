"""The invented tools of the corpus: each a schema (OpenAI function shape), ways a user asks for it, and what it
returns. Every generator draws only from the `random.Random` it is given, so a seed fixes the corpus."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Denver", "Mumbai", "Sydney", "Toronto", "Berlin",
          "Nairobi", "Seoul", "Madrid", "Chicago", "Hanoi", "Dublin", "Quito", "Prague", "Austin", "Kyiv", "Perth",
          "Lisbon", "Boston", "Manila", "Zurich", "Dakar", "Montreal", "Osaka", "Helsinki", "Bogota", "Vienna"]
NAMES = ["Alice", "Bob", "Carmen", "Deepak", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam",
         "Mei", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Yara", "Zane"]
TOPICS = ["solar panels", "sourdough bread", "rust ownership", "tide pools", "jazz history", "sleep science",
          "electric bikes", "container shipping", "honey bees", "quantum dots", "urban gardens", "chess openings",
          "volcano monitoring", "password managers", "coral reefs", "vector databases", "marathon training",
          "wind turbines", "ancient Rome", "coffee roasting", "speculative decoding", "KV caches", "glaciers"]
WORDS = ["report", "notes", "draft", "budget", "summary", "plan", "data", "config", "results", "todo", "log"]
EXTS = ["txt", "md", "json", "csv", "py", "yaml"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy"]
SYMBOLS = ["ACME", "GLOBX", "INITK", "UMBR", "SOYL", "WAYNE", "STARK", "TYRL", "HOOLI", "PIED"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "CAD", "INR", "BRL", "NGN", "KRW"]
LANGUAGES = ["French", "Spanish", "German", "Japanese", "Swahili", "Italian", "Portuguese", "Korean"]
TIMEZONES = ["UTC", "Europe/Paris", "Asia/Tokyo", "America/New_York", "Africa/Lagos", "Australia/Sydney"]
PHRASES = ["good morning", "thank you for your help", "the meeting is moved", "where is the station",
           "see you tomorrow", "the results look good", "please call me back", "the door is open"]
EVENTS = ["team sync", "dentist", "project review", "lunch with " + "Mei", "design critique", "1:1", "standup",
          "budget meeting", "demo day", "yoga class"]


def _date(r: random.Random) -> str:
    return f"2025-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"


def _clock(r: random.Random) -> str:
    return f"{r.randint(7, 20):02d}:{r.choice(['00', '15', '30', '45'])}"


def _path(r: random.Random) -> str:
    return f"{r.choice(['docs', 'data', 'src', 'notes', 'tmp'])}/{r.choice(WORDS)}_{r.randint(1, 99)}.{r.choice(EXTS)}"


def _expr(r: random.Random) -> str:
    a, b, c = r.randint(2, 999), r.randint(2, 99), r.randint(1, 50)
    return r.choice([f"{a} * {b}", f"{a} + {b} * {c}", f"({a} - {b}) / {c}", f"{a} * {b} - {c}", f"{a} + {b}"])


def _email(name: str) -> str:
    return f"{name.lower()}@example.com"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    properties: dict[str, dict]
    required: tuple[str, ...]
    make_args: Callable[[random.Random], dict]  # arguments of one call
    asks: tuple[str, ...]  # user phrasings, str.format(**args)
    make_result: Callable[[random.Random, dict], Any]  # what the tool returns (JSON-serialisable)
    answer: Callable[[dict, Any], str]  # the assistant's final answer from args and result

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": {
            "type": "object", "properties": self.properties, "required": list(self.required)}}}


def _s(desc: str) -> dict:
    return {"type": "string", "description": desc}


def _n(desc: str) -> dict:
    return {"type": "number", "description": desc}


def _calc(expr: str) -> float | int:
    value = eval(expr, {"__builtins__": {}})  # our own generated arithmetic, never user input
    return round(value, 4) if isinstance(value, float) else value


TOOLS: tuple[Tool, ...] = (
    Tool("get_weather", "Get the current weather for a city", {"city": _s("City name"), "unit": {
        "type": "string", "enum": ["celsius", "fahrenheit"]}}, ("city",),
         lambda r: {"city": r.choice(CITIES)} if r.random() < 0.6 else {"city": r.choice(CITIES), "unit": r.choice(
             ["celsius", "fahrenheit"])},
         ("What's the weather in {city}?", "Is it raining in {city} right now?", "How warm is it in {city}?",
          "Tell me the weather for {city}.", "weather {city}"),
         lambda r, a: {"city": a["city"], "temperature": r.randint(-10, 38), "condition": r.choice(CONDITIONS)},
         lambda a, res: f"It is {res['temperature']} degrees and {res['condition']} in {res['city']}."),
    Tool("calculator", "Evaluate an arithmetic expression", {"expression": _s("Expression such as 2 * (3 + 4)")},
         ("expression",), lambda r: {"expression": _expr(r)},
         ("Use the calculator: what is {expression}?", "Compute {expression}.", "Calculate {expression} for me."),
         lambda r, a: {"result": _calc(a["expression"])},
         lambda a, res: f"{a['expression']} = {res['result']}."),
    Tool("web_search", "Search the web and return the top results", {"query": _s("Search query"), "max_results": {
        "type": "integer", "description": "How many results"}}, ("query",),
         lambda r: {"query": r.choice(TOPICS)} if r.random() < 0.7 else {"query": r.choice(TOPICS), "max_results": 3},
         ("Search the web for {query}.", "Find me recent articles about {query}.", "Look up {query} online."),
         lambda r, a: {"results": [f"{a['query'].title()}: {w} {r.randint(1, 9)}" for w in r.sample(
             ["a primer", "what changed", "field notes", "an explainer", "the data"], 2)]},
         lambda a, res: f"I found: {res['results'][0]} and {res['results'][1]}."),
    Tool("read_file", "Read a text file from the workspace", {"path": _s("Path of the file")}, ("path",),
         lambda r: {"path": _path(r)},
         ("Open {path} and tell me what it says.", "Read the file {path}.", "What is in {path}?"),
         lambda r, a: {"content": f"{r.choice(WORDS)}: {r.choice(TOPICS)}, owner {r.choice(NAMES)}"},
         lambda a, res: f"{a['path']} contains: {res['content']}."),
    Tool("write_file", "Write text to a file in the workspace", {"path": _s("Path of the file"), "content": _s(
        "Text to write")}, ("path", "content"),
         lambda r: {"path": _path(r), "content": f"{r.choice(WORDS)} about {r.choice(TOPICS)}"},
         ("Save '{content}' to {path}.", "Write {content} into the file {path}."),
         lambda r, a: {"ok": True, "bytes": len(a["content"])},
         lambda a, res: f"Done: wrote {res['bytes']} bytes to {a['path']}."),
    Tool("create_event", "Create a calendar event", {"title": _s("Event title"), "date": _s("YYYY-MM-DD"),
         "time": _s("HH:MM"), "duration_minutes": {"type": "integer"}}, ("title", "date", "time"),
         lambda r: {"title": r.choice(EVENTS), "date": _date(r), "time": _clock(r)},
         ("Put {title} on my calendar on {date} at {time}.", "Schedule {title} for {date} {time}."),
         lambda r, a: {"event_id": f"ev{r.randint(100, 999)}", "status": "created"},
         lambda a, res: f"Scheduled {a['title']} on {a['date']} at {a['time']} (id {res['event_id']})."),
    Tool("list_events", "List calendar events on a day", {"date": _s("YYYY-MM-DD")}, ("date",),
         lambda r: {"date": _date(r)},
         ("What's on my calendar on {date}?", "Do I have meetings on {date}?", "List my events for {date}."),
         lambda r, a: {"events": [{"title": t, "time": _clock(r)} for t in r.sample(EVENTS, r.randint(0, 2))]},
         lambda a, res: (f"On {a['date']} you have " + ", ".join(f"{e['title']} at {e['time']}" for e in res[
             "events"]) + ".") if res["events"] else f"You have nothing scheduled on {a['date']}."),
    Tool("run_python", "Run a short Python snippet and return its output", {"code": _s("Python source")}, ("code",),
         lambda r: {"code": f"print({_expr(r)})"},
         ("Run this Python: {code}", "Execute {code} and show the output."),
         lambda r, a: {"stdout": str(_calc(a["code"][6:-1])) + "\n"},
         lambda a, res: f"The program printed {res['stdout'].strip()}."),
    Tool("send_email", "Send an email", {"to": _s("Recipient address"), "subject": _s("Subject line"), "body": _s(
        "Message body")}, ("to", "subject", "body"),
         lambda r: {"to": _email(r.choice(NAMES)), "subject": f"{r.choice(WORDS).title()} update",
                    "body": f"Hi, {r.choice(PHRASES)}."},
         ("Email {to} with subject '{subject}' saying: {body}", "Send {to} a message '{subject}': {body}"),
         lambda r, a: {"status": "sent", "message_id": f"m{r.randint(1000, 9999)}"},
         lambda a, res: f"Sent '{a['subject']}' to {a['to']}."),
    Tool("get_stock_price", "Get the latest price of a stock", {"symbol": _s("Ticker symbol")}, ("symbol",),
         lambda r: {"symbol": r.choice(SYMBOLS)},
         ("What is {symbol} trading at?", "Price of {symbol} stock?", "How is {symbol} doing today?"),
         lambda r, a: {"symbol": a["symbol"], "price": round(r.uniform(5, 900), 2), "change": round(r.uniform(
             -5, 5), 2)},
         lambda a, res: f"{res['symbol']} is at {res['price']} ({res['change']:+} today)."),
    Tool("convert_currency", "Convert money between currencies", {"amount": _n("Amount"), "from_currency": _s(
        "ISO code"), "to_currency": _s("ISO code")}, ("amount", "from_currency", "to_currency"),
         lambda r: dict(zip(("amount", "from_currency", "to_currency"), (r.randint(1, 5000), *r.sample(
             CURRENCIES, 2)))),
         ("Convert {amount} {from_currency} to {to_currency}.", "How much is {amount} {from_currency} in "
          "{to_currency}?"),
         lambda r, a: {"converted": round(a["amount"] * r.uniform(0.01, 3), 2), "currency": a["to_currency"]},
         lambda a, res: f"{a['amount']} {a['from_currency']} is {res['converted']} {res['currency']}."),
    Tool("translate", "Translate text into another language", {"text": _s("Text"), "target_language": _s(
        "Language name")}, ("text", "target_language"),
         lambda r: {"text": r.choice(PHRASES), "target_language": r.choice(LANGUAGES)},
         ("Translate '{text}' into {target_language}.", "How do you say '{text}' in {target_language}?"),
         lambda r, a: {"translation": f"[{a['target_language'][:2].lower()}] {a['text']}"},
         lambda a, res: f"In {a['target_language']}: {res['translation']}"),
    Tool("get_time", "Get the current time in a timezone", {"timezone": _s("IANA timezone")}, ("timezone",),
         lambda r: {"timezone": r.choice(TIMEZONES)},
         ("What time is it in {timezone}?", "Current time in {timezone}?"),
         lambda r, a: {"time": _clock(r), "timezone": a["timezone"]},
         lambda a, res: f"It is {res['time']} in {res['timezone']}."),
    Tool("search_flights", "Search flights between two cities on a date", {"origin": _s("City"), "destination": _s(
        "City"), "date": _s("YYYY-MM-DD")}, ("origin", "destination", "date"),
         lambda r: dict(zip(("origin", "destination", "date"), (*r.sample(CITIES, 2), _date(r)))),
         ("Find flights from {origin} to {destination} on {date}.", "Any flights {origin} to {destination} on "
          "{date}?"),
         lambda r, a: {"flights": [{"flight": f"SR{r.randint(10, 999)}", "departs": _clock(r), "price": r.randint(
             80, 1200)} for _ in range(r.randint(1, 2))]},
         lambda a, res: f"Cheapest: {min(res['flights'], key=lambda f: f['price'])['flight']} from {a['origin']} to "
                        f"{a['destination']} for {min(f['price'] for f in res['flights'])}."),
    Tool("set_reminder", "Set a reminder", {"text": _s("What to remind"), "time": _s("HH:MM")}, ("text", "time"),
         lambda r: {"text": f"call {r.choice(NAMES)}", "time": _clock(r)},
         ("Remind me to {text} at {time}.", "Set a reminder at {time}: {text}."),
         lambda r, a: {"reminder_id": f"r{r.randint(10, 99)}", "status": "set"},
         lambda a, res: f"I will remind you to {a['text']} at {a['time']}."),
    Tool("lookup_contact", "Find a person's contact details", {"name": _s("Person's name")}, ("name",),
         lambda r: {"name": r.choice(NAMES)},
         ("What's {name}'s email?", "Look up the contact details of {name}.", "How can I reach {name}?"),
         lambda r, a: {"name": a["name"], "email": _email(a["name"]), "phone": f"+1-555-{r.randint(1000, 9999)}"},
         lambda a, res: f"{res['name']}: {res['email']}, {res['phone']}."),
)
TOOLS_BY_NAME: dict[str, Tool] = {t.name: t for t in TOOLS}
